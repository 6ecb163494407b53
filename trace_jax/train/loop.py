"""The training loop, top to bottom: mesh, data, model, state, restore, steps, logs, saves.

`run(config, workdir)` resumes from `WORKDIR/checkpoints` when a checkpoint is there, otherwise
starts from scratch; it saves every `ckpt.every_steps` and at the end. SIGTERM (preemption) saves at
the next step boundary, on which all processes agree, and returns. A NaN or Inf loss stops the run
before anything is saved, so the last checkpoint stays good. Evaluation is not here.
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
from trace_jax.train import checkpoint, setup
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


def build(config) -> Setup:
  """Mesh, tokenizer (the demo world is generated first if asked), model born sharded, state."""
  mesh = factory.make_mesh(config)
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
    step_cfg = setup.step_config(config, s.tok)
    train_step = make_train_step(s.graphdef, step_cfg, s.tx, s.schedule, s.mesh,
                                 state_lib.shardings_of(s.state),
                                 setup.abstract_batch(config, s.mesh))
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
    while step < config.total_steps:
      host = next(data_iter)
      tokens += int(host["query_mask"].sum() + host["cand_mask"].sum()) * jax.process_count()
      batch = pipeline.to_global(host, s.mesh, s.model_cfg, tuple(config.data.image_grid))
      profiler.before(step)
      with jax.set_mesh(s.mesh):
        state, metrics = train_step(state, batch)
      step += 1
      profiler.after(step, metrics)
      stop = preempted.agreed()
      final = stop or step == config.total_steps
      log = step % config.log.every_steps == 0 or final
      if log or final or step % config.ckpt.every_steps == 0:
        _check_finite(metrics, step)  # Before any save: the last checkpoint stays good.
      if log:
        metrics = dict(metrics, **{pipeline.SKIPPED: np.int32(host[pipeline.SKIPPED])})
        row, tokens = writer.write(step, metrics, tokens), 0
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
  loss = float(jax.device_get(metrics["loss/total"]))
  if not np.isfinite(loss):
    raise FloatingPointError(
      f"loss is {loss} at step {step}; stopping without saving (the last checkpoint is the last "
      "good state). Lower optim.lr or check the data.")


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
  """Turns SIGTERM into a flag read at step boundaries; every process stops at the same step."""

  def __init__(self):
    self.flag = False
    self.previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def agreed(self) -> bool:
    if jax.process_count() == 1:
      return self.flag
    flags = multihost_utils.process_allgather(np.asarray(self.flag))
    return bool(np.any(flags))

  def restore(self) -> None:
    signal.signal(signal.SIGTERM, self.previous)
