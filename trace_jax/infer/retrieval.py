"""Exact top-k retrieval by cosine similarity, blockwise so memory stays bounded.

Candidate embeddings are split into blocks of `block` rows; each block is spread over the devices
of `mesh` (when given), scored against every query and reduced to its own top-k before merging,
so at most queries x (block + k) scores exist at once. `candidates` may be anything with a length
whose row slices are arrays: a `np.memmap` (`np.load(path, mmap_mode="r")`) or a file read block
by block (`eval/pools.py`'s `RowFile`, which keeps nothing resident): only one block is read from
disk at a time, so pools larger than memory stream. The encoder lives in `encode.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from trace_jax import sharding


@functools.partial(jax.jit, static_argnames="k")
def _block_top_k(q_nd, c_bd, k: int):
  scores = jnp.dot(q_nd, c_bd.T, preferred_element_type=jnp.float32)
  return jax.lax.top_k(scores, k)


def top_k(queries: np.ndarray, candidates: np.ndarray, k: int, block: int = 4096, mesh=None
          ) -> tuple[np.ndarray, np.ndarray]:
  """(scores [N, k], candidate indices [N, k]) best first; ties keep the lower index."""
  k = min(k, len(candidates))
  best_s = np.full((len(queries), 0), -np.inf, np.float32)
  best_i = np.zeros((len(queries), 0), np.int64)
  q = jnp.asarray(queries, jnp.float32)
  n_dev = 1 if mesh is None else mesh.size
  for start in range(0, len(candidates), block):
    c = np.asarray(candidates[start:start + block], np.float32)
    if n_dev > 1 and len(c) % n_dev == 0:  # Spread the block's rows over every device.
      c = sharding.put(c, mesh, ("retrieval_rows", None))
    s, i = _block_top_k(q, jnp.asarray(c), min(k, len(c)))
    best_s = np.concatenate([best_s, np.asarray(s)], axis=1)
    best_i = np.concatenate([best_i, np.asarray(i) + start], axis=1)
    order = np.lexsort((best_i, -best_s), axis=1)[:, :k]
    best_s = np.take_along_axis(best_s, order, axis=1)
    best_i = np.take_along_axis(best_i, order, axis=1)
  return best_s, best_i
