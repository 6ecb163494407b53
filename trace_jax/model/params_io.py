"""Model parameters as an Orbax checkpoint (the form a TPU pod restores from a bucket).

A parameter directory holds `model_config.json` and an Orbax `params/` item; restoring builds the
abstract model, gives every parameter its sharding on the target mesh and lets Orbax read each
shard in place. Training state (optimizer, data iterator) is not handled here.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from trace_jax import sharding
from trace_jax.model.config import ModelConfig
from trace_jax.model.qwen_vl import QwenVL

CONFIG_FILE = "model_config.json"


def save_params(model: QwenVL, out_dir: str) -> None:
  """Writes `out_dir/params` (Orbax) and `out_dir/model_config.json`; fails if they exist."""
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(out_dir, "params"), nnx.state(model, nnx.Param))
    ckptr.wait_until_finished()
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(model.cfg.to_dict(), f, indent=2)


def load_params(ckpt_dir: str, mesh: jax.sharding.Mesh | None, *, dtype: str | None = None,
                remat: str | None = None) -> QwenVL:
  """Restores a model saved by `save_params`, sharded on `mesh` (or on one device); `dtype` and
  `remat` replace the saved compute settings."""
  ckpt_dir = os.path.abspath(ckpt_dir)
  path = os.path.join(ckpt_dir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: not a trace_jax parameter checkpoint")
  with open(path) as f:
    cfg = ModelConfig.from_dict(json.load(f))
  overrides = {k: v for k, v in (("dtype", dtype), ("remat", remat)) if v is not None}
  cfg = dataclasses.replace(cfg, **overrides)
  graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: QwenVL(cfg, rngs=nnx.Rngs(0))))
  if mesh is not None:
    shardings = sharding.state_shardings(abs_state, mesh)
    abs_state = jax.tree.map(
      lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                                  sharding=s.get_value())),
      abs_state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(os.path.join(ckpt_dir, "params"), abs_state)
  return nnx.merge(graphdef, state)
