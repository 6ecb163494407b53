"""The training loop, top to bottom: mesh, data, model, state, restore, steps, logs, saves.

`run(config, workdir)` resumes from `WORKDIR/checkpoints` when a checkpoint is there, otherwise
starts from scratch; it saves every `ckpt.every_steps` and at the end. SIGTERM (preemption) saves at
the next step boundary, on which all processes agree, and returns; agreeing costs no host sync per
step (JAX's preemption sync manager). A NaN or Inf loss stops the run before anything is saved,
so the last checkpoint stays good. Bad examples the pipeline skipped are logged with their reasons
as they arrive and counted over all processes at each log step, as are texts it cut to fit.
Evaluation is not here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from trace_jax import sharding
from trace_jax.data import pipeline
from trace_jax.data import setup as data_setup
from trace_jax.model import factory
from trace_jax.train import checkpoint, setup, trained
from trace_jax.train import state as state_lib
from trace_jax.train.metrics import MetricsWriter
from trace_jax.train.step import make_train_step

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class Setup:
  """Everything a run builds before its first step."""

  mesh: Any
  tok: Any
  model_cfg: Any
  graphdef: Any
  state: state_lib.TrainState
  tx: Any
  schedule: Any


def build(config, mesh=None) -> Setup:
  """Mesh (the config's, unless given), tokenizer (the demo world is generated first if asked),
  model born sharded, state."""
  mesh = factory.make_mesh(config) if mesh is None else mesh
  if jax.process_index() == 0:  # One writer for the generated world and its tokenizer.
    data_setup.ensure_world(config.data)
    data_setup.make_tokenizer(config.data)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("data ready")
  tok = data_setup.make_tokenizer(config.data)
  model = setup.create_model(config, mesh, tok)
  model_cfg = model.cfg
  sharding.log_param_table(model, config.max_replicated_fraction)
  tx, schedule = setup.optimizer(config)
  graphdef, state = state_lib.init_state(model, tx, **setup.state_kwargs(config), mesh=mesh)
  return Setup(mesh, tok, model_cfg, graphdef, state, tx, schedule)


def run(config, workdir: str) -> dict:
  """Trains `config.total_steps` steps; returns the last logged metrics."""
  with sharding.use_rules(config.sharding_rules or sharding.DEFAULT_RULES):
    s = build(config)
    trained.save_model_config(workdir, s.model_cfg)  # Inference rebuilds the model from it.
    step_cfg = setup.step_config(config, s.tok)
    train_step = make_train_step(s.graphdef, step_cfg, s.tx, s.schedule, s.mesh,
                                 state_lib.shardings_of(s.state))
    data_iter = iter(data_setup.train_dataset(config, s.tok, s.model_cfg))
    mngr = checkpoint.manager(workdir, config.ckpt.keep)
    state, start = checkpoint.restore_latest(mngr, s.state, data_iter)
    if start is not None:
      _log.info("resumed from step %d", start)
    writer = MetricsWriter(workdir, config.total_steps)
    row, tokens = {}, 0
    step = int(start or 0)
    preempted = _Preemption()
    profiler = _Profiler(workdir, tuple(config.log.profile_steps))
    data_log = _DataLog()
    while step < config.total_steps:
      host = next(data_iter)
      data_log.add(host)
      tokens += sum(int(host[f"{side}_mask"].sum()) for side in ("query", "cand")
                    if f"{side}_mask" in host) * jax.process_count()
      batch = pipeline.to_global(host, s.mesh, s.model_cfg, tuple(config.data.image_grid))
      profiler.before(step)
      with jax.set_mesh(s.mesh):
        state, metrics = train_step(state, batch)
      step += 1
      profiler.after(step, metrics)
      stop = preempted.reached(step)
      final = stop or step == config.total_steps
      log = step % config.log.every_steps == 0 or final
      if log or final or step % config.ckpt.every_steps == 0:
        _check_finite(metrics, step)  # Before any save: the last checkpoint stays good.
      if log:
        row, tokens = writer.write(step, dict(metrics, **data_log.window()), tokens), 0
      checkpoint.save(mngr, step, state, data_iter, every_steps=config.ckpt.every_steps,
                      final=final)
      if stop:
        _log.warning("SIGTERM: saved step %d, exiting", step)
        print(f"preempted: saved a checkpoint at step {step}; rerun the command to resume",
              flush=True)
        break
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    preempted.restore()
  return row


def _check_finite(metrics, step: int) -> None:
  """A non-finite loss, or a non-finite gradient norm (whose update is garbage even when the
  loss still reads finite, e.g. logits past float32's range), stops the run before a save."""
  values = jax.device_get((metrics["loss/total"], metrics["optim/grad_norm"]))
  loss, norm = (float(x) for x in values)
  if not (np.isfinite(loss) and np.isfinite(norm)):
    raise FloatingPointError(
      f"loss is {loss} (gradient norm {norm}) at step {step}; stopping without saving (the last "
      "checkpoint is the last good state). Lower optim.lr or check the data.")


class _Profiler:
  """A `jax.profiler` trace of steps [start, stop) into WORKDIR/profile (empty range: none)."""

  def __init__(self, workdir: str, steps: tuple[int, ...]):
    self.dir = os.path.join(workdir, "profile")
    self.start, self.stop = steps if steps else (-1, -1)

  def before(self, step: int) -> None:
    if step == self.start:
      jax.profiler.start_trace(self.dir)

  def after(self, step: int, metrics) -> None:
    if step == self.stop:
      jax.block_until_ready(metrics)
      jax.profiler.stop_trace()


class _Preemption:
  """SIGTERM, turned into a stop at a step boundary on which every process agrees.

  One process: a flag set by a signal handler. Several: JAX's preemption sync manager (started
  by `jax.distributed.initialize`) catches SIGTERM on whichever process gets it, and the
  processes agree in the background on the first step all can stop at, so no step waits on a
  host sync. It needs every process to call `reached` at every step, from the same start.
  """

  def __init__(self):
    self.multi = jax.process_count() > 1
    self.flag = False
    if not self.multi:  # Several processes: JAX's handler must keep the signal.
      self.previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def reached(self, step: int) -> bool:
    if self.multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.flag

  def restore(self) -> None:
    if not self.multi:
      signal.signal(signal.SIGTERM, self.previous)


class _DataLog:
  """What the pipeline skipped and cut: each skipped example logged with its reason when its
  batch arrives; counts over every process at each log step (one small gather there, none in
  between), per log window and in total since this process started."""

  def __init__(self):
    self.window_counts = np.zeros(2, np.int64)  # (skipped, truncated) by this process.
    self.totals = np.zeros(2, np.int64)  # Over all processes.
    self.examples: list[str] = []  # A few cut texts of this window, named in the log.

  def add(self, host: dict) -> None:
    for reason in host[pipeline.SKIP_REASONS]:
      _log.warning("skipped bad example %s", reason)
    cut = host[pipeline.TRUNCATED]
    self.window_counts += (int(host[pipeline.SKIPPED]), len(cut))
    self.examples = (self.examples + cut)[:3]

  def window(self) -> dict[str, int]:
    counts = self.window_counts
    if jax.process_count() > 1:
      counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 2).sum(0)
    self.totals += counts
    if counts[1]:
      _log.info("%d texts cut to fit since the last log (all processes), e.g. %s", counts[1],
                "; ".join(self.examples))
    self.window_counts, self.examples = np.zeros(2, np.int64), []
    return {pipeline.SKIPPED: int(counts[0]), "data/skipped_total": int(self.totals[0]),
            pipeline.TRUNCATED: int(counts[1]), "data/truncated_total": int(self.totals[1])}
