"""Exact top-k retrieval by cosine similarity, blockwise so memory stays bounded.

Candidate embeddings are split into blocks of `block` rows; each block's scores are reduced to its
own top-k before merging, so at most queries x (block + k) scores exist at once. The encoder lives
in `encode.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames="k")
def _block_top_k(q_nd, c_bd, k: int):
  scores = jnp.dot(q_nd, c_bd.T, preferred_element_type=jnp.float32)
  return jax.lax.top_k(scores, k)


def top_k(queries: np.ndarray, candidates: np.ndarray, k: int, block: int = 4096
          ) -> tuple[np.ndarray, np.ndarray]:
  """(scores [N, k], candidate indices [N, k]) best first; ties keep the lower index."""
  k = min(k, len(candidates))
  best_s = np.full((len(queries), 0), -np.inf, np.float32)
  best_i = np.zeros((len(queries), 0), np.int64)
  q = jnp.asarray(queries, jnp.float32)
  for start in range(0, len(candidates), block):
    c = candidates[start:start + block]
    s, i = _block_top_k(q, jnp.asarray(c, jnp.float32), min(k, len(c)))
    best_s = np.concatenate([best_s, np.asarray(s)], axis=1)
    best_i = np.concatenate([best_i, np.asarray(i) + start], axis=1)
    order = np.lexsort((best_i, -best_s), axis=1)[:, :k]
    best_s = np.take_along_axis(best_s, order, axis=1)
    best_i = np.take_along_axis(best_i, order, axis=1)
  return best_s, best_i
