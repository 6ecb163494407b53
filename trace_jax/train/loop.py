"""The training loop, top to bottom: mesh, data, model, state, restore, steps, logs, saves.

`run(config, workdir)` resumes from `WORKDIR/checkpoints` when a checkpoint is there, otherwise
starts from `ckpt.init_from` or from scratch; it saves every `ckpt.every_steps` and at the end.
Evaluation is not here.
"""

from __future__ import annotations

import dataclasses
import logging

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


def run(config, workdir: str) -> dict:
  """Trains `config.total_steps` steps; returns the last logged metrics."""
  mesh = factory.make_mesh(config)
  with sharding.use_rules(config.sharding_rules or sharding.DEFAULT_RULES):
    data_setup.ensure_world(config.data)
    tok = data_setup.make_tokenizer(config.data)
    model_cfg = data_setup.with_token_ids(factory.model_config(config), tok)
    model = sharding.create_sharded(setup.make_model_fn(config, model_cfg), mesh)
    sharding.log_param_table(model, config.max_replicated_fraction)
    tx, schedule = setup.optimizer(config)
    graphdef, state = state_lib.init_state(model, tx, **setup.state_kwargs(config), mesh=mesh)
    del model
    step_cfg = dataclasses.replace(StepConfig.from_config(config), emb_token_id=tok.emb_id)
    train_step = make_train_step(graphdef, step_cfg, tx, schedule, mesh,
                                 state_lib.shardings_of(state), setup.abstract_batch(config, mesh))
    data_iter = iter(data_setup.train_dataset(config, tok, model_cfg))
    mngr = checkpoint.manager(workdir, config.ckpt.keep)
    state, start = checkpoint.restore_latest(mngr, state, data_iter)
    if start is not None:
      logging.info("resumed from step %d", start)
    writer = MetricsWriter(workdir, config.total_steps)
    row, tokens = {}, 0
    step = int(start or 0)
    while step < config.total_steps:
      host = next(data_iter)
      tokens += int(host["query_mask"].sum() + host["cand_mask"].sum()) * jax.process_count()
      batch = pipeline.to_global(host, mesh, model_cfg, tuple(config.data.image_grid))
      with jax.set_mesh(mesh):
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
