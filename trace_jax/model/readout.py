"""Where the embedding is read: the position whose last-layer hidden state is the embedding, and
the L2 normalisation applied to it. Training (`train/step.py`) and inference (`infer/encode.py`)
both read here, so they read the same position.

TRACE reads the token just before the first `<|emb|>` (`pre_token`, the paper's choice; TRACE.md,
"Model"); the ablations read `<|emb|>` itself (`emb`) or an end-of-reasoning marker
(`end_of_reasoning`). This module runs no model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

READOUTS = ("pre_token", "emb", "end_of_reasoning")


def readout_index(ids_bt: jax.Array, mode: str, emb_id: int, eor_id: int) -> jax.Array:
  """Index [B] of the position whose hidden state is the embedding (first `<|emb|>` based).

  `end_of_reasoning` reads the last `eor_id` token before the first `<|emb|>`, or the pre-token
  of a row that has none (a direct query).
  """
  t = ids_bt.shape[1]
  emb = jnp.argmax(ids_bt == emb_id, axis=1)
  if mode == "emb":
    return emb
  pre = emb - 1
  if mode == "pre_token":
    return pre
  before = (ids_bt == eor_id) & (jnp.arange(t)[None] < emb[:, None])
  last = t - 1 - jnp.argmax(before[:, ::-1], axis=1)
  return jnp.where(before.any(axis=1), last, pre)


def normalize(x: jax.Array) -> jax.Array:
  """L2-normalised float32 rows (the embeddings are compared by cosine similarity)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
