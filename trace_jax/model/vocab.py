"""Grows the token embedding and unembedding for added special tokens such as `<|emb|>`.

New rows start at the mean of the rows that were trained, the usual choice for added tokens. Rows
that already exist (Qwen pads its vocabulary past the tokenizer) are overwritten the same way.
It does not touch tokenizers (see `trace_jax/data/tokenizer.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from trace_jax import sharding
from trace_jax.model.qwen_vl import QwenVL


def _grow(x: jax.Array, axis: int, new_size: int, ids: Sequence[int], num_trained: int,
          axes: Sequence[str | None]) -> jax.Array:
  shape = list(x.shape)
  shape[axis] = new_size
  out_sharding = None
  if isinstance(getattr(x, "sharding", None), NamedSharding):
    mesh = x.sharding.mesh
    out_sharding = NamedSharding(mesh, sharding.logical_to_spec(axes, shape, mesh))

  def fn(x):
    mean = jnp.mean(jax.lax.slice_in_dim(x, 0, num_trained, axis=axis).astype(jnp.float32),
                    axis=axis, keepdims=True).astype(x.dtype)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, new_size - x.shape[axis])
    y = jnp.pad(x, pad)
    idx = jnp.asarray(ids)
    rows = jnp.broadcast_to(mean, tuple(len(ids) if a == axis else s for a, s in enumerate(shape)))
    return y.at[(slice(None),) * axis + (idx,)].set(rows)

  return jax.jit(fn, out_shardings=out_sharding)(x)


def add_token_rows(model: QwenVL, token_ids: Sequence[int], num_trained_rows: int) -> QwenVL:
  """Sets (and if needed appends) the rows of `token_ids` to the mean of the first
  `num_trained_rows` rows, in `embed` and in the untied `lm_head`; updates `model.cfg`.

  Raises ValueError when `num_trained_rows` exceeds the model's vocab_size (a tokenizer bigger than
  the checkpoint's embedding)."""
  if not token_ids:
    return model
  cfg = model.cfg
  if not 0 < num_trained_rows <= cfg.text.vocab_size:
    # E.g. a tokenizer with more tokens than the checkpoint has embedding rows: the wrong pair.
    raise ValueError(f"num_trained_rows={num_trained_rows} must be in [1, {cfg.text.vocab_size}] "
                     f"(the model's vocab_size); is the tokenizer that of this checkpoint?")
  new_size = max(cfg.text.vocab_size, max(token_ids) + 1)
  model.embed.set_value(_grow(model.embed[...], 0, new_size, token_ids, num_trained_rows,
                              sharding.variable_axes(model.embed)))
  if model.lm_head is not None:
    k = model.lm_head.kernel
    k.set_value(_grow(k[...], 1, new_size, token_ids, num_trained_rows, sharding.variable_axes(k)))
  model.cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=new_size))
  return model
