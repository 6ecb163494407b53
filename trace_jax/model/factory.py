"""An experiment config's model config and mesh, and pretrained weights to start from.

`ckpt.init_from` may name a Hugging Face directory or an Orbax parameter checkpoint written by
`trace_jax.tools.import_hf`. Building the trainable model (LoRA) is `train/setup.py`'s job.
"""

from __future__ import annotations

import os

import jax

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


def load_pretrained(source: str, mesh: jax.sharding.Mesh | None, model) -> QwenVL:
  """A Hugging Face directory or an Orbax parameter checkpoint (tools/import_hf), sharded on
  `mesh`; the checkpoint gives the architecture, the config section `model` the compute dtype,
  parameter dtype and remat policy."""
  if os.path.exists(os.path.join(source, "config.json")):
    return load_hf(source, dtype=model.dtype, param_dtype=model.param_dtype, mesh=mesh,
                   remat=model.remat)[0]
  return params_io.load_params(source, mesh, dtype=model.dtype, remat=model.remat)
