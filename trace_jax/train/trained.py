"""A trained run's model for use elsewhere (evaluation, the teacher, export): the config's model
built on a given mesh with the newest checkpoint of its workdir restored into it. It trains
nothing and keeps no optimizer state it does not have to read.
"""

from __future__ import annotations

import json
import os

import ml_collections
from flax import nnx

from trace_jax.model import token_rows
from trace_jax.model.lora import merge_lora
from trace_jax.train import checkpoint
from trace_jax.train.loop import build


def load_model(config, workdir: str, mesh):
  """(model with the newest checkpoint's weights, tokenizer, step, mesh) on `mesh`, ready for
  inference: LoRA adapters folded into their kernels and added tokens' trained rows written
  into the vocabulary (the same function; the demo's queries encode ~1.2x faster merged)."""
  s = build(config, mesh)
  state, step = checkpoint.restore_state(workdir, s.state)
  model = nnx.merge(s.graphdef, state.params["model"], state.frozen)
  return token_rows.merge(merge_lora(model)), s.tok, step, s.mesh


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The experiment config a run saved beside its checkpoints (`trace_jax.main` writes
  `WORKDIR/config.json`)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: a run started before configs were saved beside "
                            "its checkpoints; pass its config file instead")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
