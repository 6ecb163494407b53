"""A trained run's model for use elsewhere (evaluation, the teacher, export): the config's model
built abstractly on a given mesh and only its weights restored from the newest checkpoint of its
workdir, in the dtype asked (`eval.param_dtype`). It trains nothing: no optimizer state is built
or read, and `ckpt.init_from` is not read again (the architecture it gave the run is saved beside
the checkpoints as `WORKDIR/model_config.json`, `save_model_config`).
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.experimental import multihost_utils

from trace_jax import sharding
from trace_jax.data import setup as data_setup
from trace_jax.model import factory, token_rows
from trace_jax.model.config import ModelConfig
from trace_jax.model.lora import merge_lora
from trace_jax.train import checkpoint
from trace_jax.train import setup as train_setup
from trace_jax.train import state as state_lib

MODEL_CONFIG = "model_config.json"
PARAM_DTYPES = ("float32", "bfloat16")
_log = logging.getLogger(__name__)


def load_model(config, workdir: str, mesh=None):
  """(model with the newest checkpoint's weights, tokenizer, step, mesh) on `mesh` (default:
  the config's training mesh), ready for inference: LoRA adapters folded into their kernels and
  added tokens' trained rows written into the vocabulary (the same function; the demo's queries
  encode ~1.2x faster merged).

  Only the parameter and frozen subtrees of the checkpoint are read (an Orbax partial restore),
  cast to `config.eval.param_dtype` (float32 when the config predates the field). Adapters are
  read in float32 and folded in float32 before the kernel is rounded to that dtype.
  """
  dtype = config.eval.get("param_dtype", "float32")
  if dtype not in PARAM_DTYPES:
    raise ValueError(f"eval.param_dtype={dtype!r}; expected one of {PARAM_DTYPES}")
  mesh = factory.make_mesh(config) if mesh is None else mesh
  tok = _tokenizer(config)
  model_cfg = model_config(config, workdir, tok)
  if model_cfg is None:  # A run from before model_config.json, started from init_from.
    _log.warning("%s has no %s: rebuilding the training setup (reads ckpt.init_from %s)",
                 workdir, MODEL_CONFIG, config.ckpt.init_from)
    return _load_via_training_setup(config, workdir, mesh, dtype)
  graphdef, weights, step = restore_weights(config, workdir, mesh, model_cfg, tok, dtype)
  model = nnx.merge(graphdef, weights["params"]["model"], weights["frozen"])
  return token_rows.merge(merge_lora(model)), tok, step, mesh


def restore_weights(config, workdir: str, mesh, model_cfg: ModelConfig, tok,
                    dtype: str = "float32"):
  """(graphdef, {"params": {"model": trainable state}, "frozen": frozen state}, step): the
  newest checkpoint's weights, unmerged, on `mesh`, for a model built abstractly from
  `model_cfg` (floating weights in `dtype`, adapters in float32)."""
  # The structure `train.setup.create_model` leaves: added-token rows under LoRA when started
  # from init_from, then the adapters.
  rows = (tuple(getattr(tok, "added_ids", None) or ())
          if config.ckpt.init_from and config.lora.rank else ())
  abstract = nnx.eval_shape(train_setup.make_model_fn(config, model_cfg.replace(param_dtype=dtype),
                                                      rows))
  graphdef, trainable, frozen = state_lib.split_model(abstract, config.lora.rank,
                                                      config.optim.train_vision)
  target = {"params": {"model": trainable}, "frozen": frozen}
  weights, step = checkpoint.restore_params(workdir, _targets(target, mesh, dtype))
  return graphdef, weights, step


def save_model_config(workdir: str, model_cfg: ModelConfig) -> None:
  """Writes the run's model config (the architecture `ckpt.init_from` gave it, special-token
  ids, vocabulary rows added) beside its checkpoints, so `load_model` need not read init_from."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, MODEL_CONFIG)
  with open(path + ".tmp", "w") as f:
    json.dump(model_cfg.to_dict(), f, indent=2)
  os.replace(path + ".tmp", path)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The experiment config a run saved beside its checkpoints (`trace_jax.main` writes
  `WORKDIR/config.json`)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: a run started before configs were saved beside "
                            "its checkpoints; pass its config file instead")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _tokenizer(config):
  """The run's tokenizer (the demo world and its tokenizer made first, as training does)."""
  if jax.process_index() == 0:  # One writer for the generated world and its tokenizer.
    data_setup.ensure_world(config.data)
    data_setup.make_tokenizer(config.data)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("data ready")
  return data_setup.make_tokenizer(config.data)


def model_config(config, workdir: str, tok) -> ModelConfig | None:
  """The run's saved model config (`save_model_config`); without one, the config's (as a run
  without init_from builds it), or None for a run from init_from (whose architecture only
  init_from knows)."""
  path = os.path.join(workdir, MODEL_CONFIG)
  if os.path.isfile(path):
    with open(path) as f:
      saved = ModelConfig.from_dict(json.load(f))
    # The compute dtype and remat policy are the evaluating config's to choose.
    return saved.replace(dtype=config.model.dtype, remat=config.model.remat)
  if config.ckpt.init_from:
    return None
  return data_setup.with_token_ids(factory.model_config(config), tok)


def _targets(tree, mesh, dtype: str):
  """ShapeDtypeStructs of an abstract state tree with their shardings on `mesh`: floating
  weights in `dtype`, LoRA adapters in float32 (folded before rounding), the rest as saved."""
  def one(v):
    x = v.get_value()
    spec = sharding.logical_to_spec(sharding.variable_axes(v), x.shape, mesh)
    want = x.dtype
    if jnp.issubdtype(x.dtype, jnp.floating):
      want = jnp.float32 if isinstance(v, nnx.LoRAParam) else jnp.dtype(dtype)
    return v.replace(jax.ShapeDtypeStruct(x.shape, want,
                                          sharding=jax.sharding.NamedSharding(mesh, spec)))
  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _load_via_training_setup(config, workdir: str, mesh, dtype: str):
  """The training setup's path (optimizer state built, init_from read), for runs without a
  saved model config."""
  from trace_jax.train.loop import build  # Only here: the inference path needs no optimizer.
  s = build(config, mesh)
  state, step = checkpoint.restore_state(workdir, s.state)
  model = token_rows.merge(merge_lora(nnx.merge(s.graphdef, state.params["model"],
                                                state.frozen)))
  if dtype != "float32":
    _cast_params(model, jnp.dtype(dtype))
  return model, s.tok, step, s.mesh


def _cast_params(model, dtype) -> None:
  """Casts every floating parameter of `model` to `dtype` in place (shardings kept)."""
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    x = var.get_value()
    if jnp.issubdtype(x.dtype, jnp.floating):
      var.set_value(x.astype(dtype))
