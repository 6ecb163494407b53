"""Training metrics: `WORKDIR/metrics.jsonl` (one object per logged step), TensorBoard event
files under `WORKDIR/tensorboard` (tensorboardX, no TensorFlow) and a progress line.

Only process 0 writes. This module computes no metric; the train step does.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from tensorboardX import SummaryWriter


class MetricsWriter:
  """Appends logged steps to metrics.jsonl and prints step, losses, tokens/s and ETA."""

  def __init__(self, workdir: str, total_steps: int):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.total = total_steps
    self.active = jax.process_index() == 0
    self._last = (None, 0)  # (time, step) of the previous log.
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard")) if self.active else None

  def write(self, step: int, metrics: dict, tokens: int) -> dict:
    """Logs `metrics` (device values) of `step`; `tokens` processed since the last log."""
    row = {"step": step, **{k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}}
    now = time.time()
    last_time, last_step = self._last
    if last_time is not None and step > last_step:
      row["perf/tokens_per_s"] = tokens / (now - last_time)
      row["perf/s_per_step"] = (now - last_time) / (step - last_step)
    self._last = (now, step)
    if self.active:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
      for key, value in row.items():
        if key != "step":
          self.tb.add_scalar(key, value, step)
      self.tb.flush()
      eta = row.get("perf/s_per_step", 0.0) * (self.total - step)
      print(f"step {step}/{self.total}  loss {row['loss/total']:.4f}  lm {row['loss/lm']:.4f}  "
            f"ret {row['loss/contrastive']:.4f}  top1 {row['contrastive/top1']:.2f}  "
            f"{row.get('perf/tokens_per_s', 0):.0f} tok/s  eta {eta:.0f}s", flush=True)
    return row

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
