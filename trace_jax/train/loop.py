"""The training loop, top to bottom: mesh, data, model, state, restore, steps, logs, saves.

`run(config, workdir)` resumes from `WORKDIR/checkpoints` when a checkpoint is there, otherwise
starts from `ckpt.init_from` or from scratch; it saves every `ckpt.every_steps` and at the end.
Evaluation is not here.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import numpy as np

from trace_jax import sharding
from trace_jax.data import pipeline
from trace_jax.data import setup as data_setup
from trace_jax.model import factory
from trace_jax.train import checkpoint, setup
from trace_jax.train import state as state_lib
from trace_jax.train.metrics import MetricsWriter
from trace_jax.train.step import StepConfig, make_train_step


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
  data_setup.ensure_world(config.data)
  tok = data_setup.make_tokenizer(config.data)
  model_cfg = data_setup.with_token_ids(factory.model_config(config), tok)
  model = sharding.create_sharded(setup.make_model_fn(config, model_cfg), mesh)
  sharding.log_param_table(model, config.max_replicated_fraction)
  tx, schedule = setup.optimizer(config)
  graphdef, state = state_lib.init_state(model, tx, **setup.state_kwargs(config), mesh=mesh)
  return Setup(mesh, tok, model_cfg, graphdef, state, tx, schedule)


def run(config, workdir: str) -> dict:
  """Trains `config.total_steps` steps; returns the last logged metrics."""
  with sharding.use_rules(config.sharding_rules or sharding.DEFAULT_RULES):
    s = build(config)
    step_cfg = dataclasses.replace(StepConfig.from_config(config), emb_token_id=s.tok.emb_id)
    train_step = make_train_step(s.graphdef, step_cfg, s.tx, s.schedule, s.mesh,
                                 state_lib.shardings_of(s.state),
                                 setup.abstract_batch(config, s.mesh))
    data_iter = iter(data_setup.train_dataset(config, s.tok, s.model_cfg))
    mngr = checkpoint.manager(workdir, config.ckpt.keep)
    state, start = checkpoint.restore_latest(mngr, s.state, data_iter)
    if start is not None:
      logging.info("resumed from step %d", start)
    writer = MetricsWriter(workdir, config.total_steps)
    row, tokens = {}, 0
    step = int(start or 0)
    while step < config.total_steps:
      host = next(data_iter)
      tokens += int(host["query_mask"].sum() + host["cand_mask"].sum()) * jax.process_count()
      batch = pipeline.to_global(host, s.mesh, s.model_cfg, tuple(config.data.image_grid))
      with jax.set_mesh(s.mesh):
        state, metrics = train_step(state, batch)
      step += 1
      if step % config.log.every_steps == 0 or step == config.total_steps:
        metrics = dict(metrics, **{pipeline.SKIPPED: np.int32(host[pipeline.SKIPPED])})
        row, tokens = writer.write(step, metrics, tokens), 0
      checkpoint.save(mngr, step, state, data_iter, every_steps=config.ckpt.every_steps,
                      final=step == config.total_steps)
    mngr.wait_until_finished()
    mngr.close()
  return row
