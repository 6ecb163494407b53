"""Trainable rows for added tokens (`<|emb|>`) over a frozen vocabulary.

Fine-tuning with LoRA freezes the embedding and the output projection, so an added token would
keep the row `vocab.add_token_rows` gave it, the mean of the trained rows: its logit h . mean is
then the mean of the other logits and never the largest, and a model could never choose to write
`<|emb|>` first. `attach` gives the added tokens their own trainable rows (and `lm_head` columns
when it is untied), a few vectors instead of the whole vocabulary's optimizer state; the model's
lookup and output projection read them in place of the frozen ones. `merge` writes them back
into the full matrices (export). What trains is decided in `trace_jax/train/state.py`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class TokenRows(nnx.Module):
  """The rows of `ids` in the embedding (`embed` [n, D]) and, when untied, the columns of
  `lm_head` (`head` [D, n]), initialised from the model's current ones."""

  def __init__(self, embed: jax.Array, head: jax.Array | None, ids: Sequence[int]):
    index = jnp.asarray(ids)
    self.ids = tuple(int(i) for i in ids)
    self.embed = nnx.Param(embed[index], logical_axes=(None, "embed"))
    self.head = None if head is None else nnx.Param(head[:, index], logical_axes=("embed", None))

  def over_embed(self, table: jax.Array) -> jax.Array:
    """`table` [V, D] with these tokens' rows replaced."""
    return table.at[jnp.asarray(self.ids)].set(self.embed[...].astype(table.dtype))

  def over_head(self, kernel: jax.Array) -> jax.Array:
    """An untied `lm_head` kernel [D, V] with these tokens' columns replaced."""
    return kernel.at[:, jnp.asarray(self.ids)].set(self.head[...].astype(kernel.dtype))


def attach(model, token_ids: Sequence[int]):
  """Gives `token_ids` trainable rows on `model` (a `QwenVL`); returns the same model."""
  if not token_ids:
    return model
  head = None if model.lm_head is None else model.lm_head.kernel[...]
  model.token_rows = TokenRows(model.embed[...], head, token_ids)
  return model


def merge(model):
  """Writes the trained rows into `embed` (and `lm_head`) and removes them; returns the model."""
  rows = model.token_rows
  if rows is None:
    return model
  model.embed.set_value(_keep_sharding(rows.over_embed(model.embed[...]), model.embed))
  if model.lm_head is not None:
    kernel = model.lm_head.kernel
    kernel.set_value(_keep_sharding(rows.over_head(kernel[...]), kernel))
  model.token_rows = None
  return model


def _keep_sharding(x: jax.Array, like: nnx.Variable) -> jax.Array:
  old = like.get_value()
  sh = getattr(old, "sharding", None)
  return jax.device_put(x, sh) if sh is not None else x
