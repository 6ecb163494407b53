"""Builds a model from an experiment config: fresh (born sharded), or from a checkpoint.

It does not train; `ckpt.init_from` may name a Hugging Face directory or an Orbax parameter
checkpoint written by `trace_jax.tools.import_hf`.
"""

from __future__ import annotations

import os

import jax
from flax import nnx

from trace_jax import sharding
from trace_jax.model import params_io
from trace_jax.model.config import ModelConfig
from trace_jax.model.hf_io import load_hf
from trace_jax.model.qwen_vl import QwenVL


def model_config(config) -> ModelConfig:
  """The frozen ModelConfig of an ml-collections experiment config (typos fail here)."""
  return ModelConfig.from_dict(config.model.to_dict())


def make_mesh(config) -> jax.sharding.Mesh:
  return sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)


def create_model(config, mesh: jax.sharding.Mesh) -> QwenVL:
  """The model of `config`, from `config.ckpt.init_from` when set, else freshly initialised."""
  cfg = model_config(config)
  source = config.ckpt.init_from
  if not source:
    return sharding.create_sharded(lambda: QwenVL(cfg, rngs=nnx.Rngs(config.seed)), mesh)
  if os.path.exists(os.path.join(source, "config.json")):
    model, _ = load_hf(source, dtype=cfg.dtype, param_dtype=cfg.param_dtype, mesh=mesh)
    return model
  return params_io.load_params(source, mesh, dtype=cfg.dtype)
