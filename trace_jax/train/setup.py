"""From an experiment config to the pieces of training: the model maker (with LoRA), the step
config, the optimizer, and the train state and batch as shapes with shardings (what ahead-of-time
compilation and sharded initialisation need). It runs no step.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from trace_jax import sharding
from trace_jax.data import setup as data_setup
from trace_jax.data.batch import batch_shardings
from trace_jax.data.examples import LM_TARGET
from trace_jax.model import factory, token_rows
from trace_jax.model.lora import apply_lora
from trace_jax.model.vocab import add_token_rows
from trace_jax.model.positions import vision_layout
from trace_jax.model.qwen_vl import QwenVL
from trace_jax.train import state as state_lib
from trace_jax.train import step as step_lib


def make_model_fn(config, model_cfg=None, token_row_ids=()) -> Callable[[], QwenVL]:
  """A function that builds the config's model (or `model_cfg`'s, e.g. with the tokenizer's
  special-token ids), with trainable rows for `token_row_ids` (`model.token_rows`, as
  `create_model` attaches them under LoRA) and LoRA adapters when `lora.rank > 0`."""
  cfg = model_cfg or factory.model_config(config)

  def make() -> QwenVL:
    model = QwenVL(cfg, rngs=nnx.Rngs(config.seed))
    if token_row_ids:
      token_rows.attach(model, token_row_ids)
    if config.lora.rank:
      apply_lora(model, rank=config.lora.rank, alpha=config.lora.alpha,
                 dropout=config.lora.dropout, targets=tuple(config.lora.targets),
                 rngs=nnx.Rngs(config.seed + 1))
    return model
  return make


def create_model(config, mesh, tok) -> QwenVL:
  """The model to train, born sharded on `mesh`: fresh from the config (special-token ids from
  the tokenizer), or `ckpt.init_from`'s weights (the checkpoint's architecture; `<|emb|>` rows
  added for the tokenizer's new tokens, trainable under LoRA: `model.token_rows`) with LoRA
  adapters added and sharded."""
  if not config.ckpt.init_from:
    model_cfg = data_setup.with_token_ids(factory.model_config(config), tok)
    return sharding.create_sharded(make_model_fn(config, model_cfg), mesh)
  model = factory.load_pretrained(config.ckpt.init_from, mesh, config.model)
  if getattr(tok, "added_ids", None):
    add_token_rows(model, tok.added_ids, tok.num_base_tokens)
    if config.lora.rank:  # A frozen mean row could never be the likeliest token: train it.
      token_rows.attach(model, tok.added_ids)
  model.cfg = data_setup.with_token_ids(model.cfg, tok)
  if config.lora.rank:
    apply_lora(model, rank=config.lora.rank, alpha=config.lora.alpha, dropout=config.lora.dropout,
               targets=tuple(config.lora.targets), rngs=nnx.Rngs(config.seed + 1))
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, sharding.state_shardings(state, mesh)))
  return model


def step_config(config, tok) -> step_lib.StepConfig:
  """The train step's settings: `config.loss` with the special-token ids of the tokenizer."""
  eor = data_setup.marker_id(config.data, tok)
  if config.loss.readout == "end_of_reasoning" and eor < 0:
    raise ValueError("loss.readout='end_of_reasoning' reads the end-of-reasoning marker: set "
                     "data.reasoning_marker=True so that the targets carry it")
  if config.data.target == LM_TARGET:  # A backbone's pretraining: no candidates, no <|emb|>.
    if (config.loss.lambda_ret or config.optim.micro_batches != 1 or
        config.data.hard_negatives != "none"):
      raise ValueError("data.target='lm' trains the language model alone: it needs "
                       "loss.lambda_ret=0, optim.micro_batches=1 and data.hard_negatives='none'")
    return dataclasses.replace(step_lib.StepConfig.from_config(config), emb_token_id=-1)
  return dataclasses.replace(step_lib.StepConfig.from_config(config), emb_token_id=tok.emb_id,
                             eor_token_id=eor)


def optimizer(config):
  return state_lib.make_optimizer(config.optim, max(config.total_steps, 1))


def state_kwargs(config) -> dict:
  """`init_state` keyword arguments of a config."""
  return dict(lora_rank=config.lora.rank, temperature=config.loss.temperature,
              learn_temperature=config.loss.learn_temperature,
              train_vision=config.optim.train_vision)


def abstract_state(config, mesh):
  """(graphdef, TrainState of ShapeDtypeStructs carrying their shardings, tx, schedule)."""
  make = make_model_fn(config)
  tx, schedule = optimizer(config)
  kw = state_kwargs(config)
  graphdef, _, _ = state_lib.split_model(nnx.eval_shape(make), config.lora.rank,
                                         config.optim.train_vision)
  shapes = jax.eval_shape(lambda: state_lib.init_state(make(), tx, **kw)[1])
  shard = lambda tree: sharding.state_shardings(tree, mesh)  # noqa: E731
  params_sh = {k: (shard(v) if k == "model" else sharding.replicated(mesh))
               for k, v in shapes.params.items()}
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, shapes.opt_state, params_sh,
                                 transform_non_params=lambda _: sharding.replicated(mesh),
                                 is_leaf=lambda x: isinstance(x, nnx.Variable))
  shardings = state_lib.TrainState(sharding.replicated(mesh), params_sh, shard(shapes.frozen),
                                   opt_sh)
  return graphdef, with_shardings(shapes, shardings), tx, schedule


def with_shardings(shapes, shardings):
  """ShapeDtypeStructs of `shapes` carrying the matching leaf of `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings)


def abstract_batch(config, mesh) -> dict:
  """The shapes (with shardings) of one global batch of the config's bucket: queries with a
  reasoning target and an image, and candidates with an image."""
  cfg = factory.model_config(config)
  b, grid = config.data.global_batch, tuple(config.data.image_grid)
  patches = int(np.prod(grid))
  layout = vision_layout(np.array([grid]), cfg.vision, windowed=cfg.family == "qwen2_5_vl")
  batch = {"query_is_reasoning": jax.ShapeDtypeStruct((b,), jnp.int32),
           "cand_key": jax.ShapeDtypeStruct((b,), jnp.int32)}
  for side, t in (("query", config.data.query_len), ("cand", config.data.cand_len)):
    batch.update({
      f"{side}_ids": jax.ShapeDtypeStruct((b, t), jnp.int32),
      f"{side}_mask": jax.ShapeDtypeStruct((b, t), jnp.int32),
      f"{side}_positions": jax.ShapeDtypeStruct((3, b, t), jnp.int32),
      f"{side}_pixels": jax.ShapeDtypeStruct((b, patches, cfg.vision.patch_dim), jnp.float32),
      f"{side}_layout": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), layout),
    })
  batch["query_target_mask"] = jax.ShapeDtypeStruct((b, config.data.query_len), jnp.int32)
  if config.data.cand_target != "none":  # Candidate-side reasoning: candidates have targets too.
    batch["cand_target_mask"] = jax.ShapeDtypeStruct((b, config.data.cand_len), jnp.int32)
  return with_shardings(batch, batch_shardings(batch, mesh))
