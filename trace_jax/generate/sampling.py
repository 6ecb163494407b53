"""Choosing the next token: greedy, or a draw from the temperature / top-k / top-p filtered
distribution with a key of the example's own.

A row's key is `fold_in(key(seed), n)` for its seed and the number of tokens it has written, so
its draws depend on nothing else: not on the batch it ran in, its slot, or its neighbours (an
example's output is the same however the engine scheduled it). This module runs no model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen. `temperature == 0` is greedy (top-k / top-p unused)."""

  temperature: float = 0.0
  top_k: int = 0  # Keep the k most likely tokens (0: all).
  top_p: float = 1.0  # Keep the smallest set of most likely tokens whose mass reaches top_p.

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"{self}: expected temperature >= 0, top_k >= 0, 0 < top_p <= 1")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def filtered_logits(logits_bv: jax.Array, s: Sampling) -> jax.Array:
  """Float32 logits of the distribution a draw samples from: divided by the temperature, the
  tokens outside the top-k and outside the top-p nucleus set to -inf (ties at the boundary
  kept). Top-p keeps every token whose preceding mass (sorted, most likely first) is below
  top_p, so the most likely token always survives."""
  x = logits_bv.astype(jnp.float32) / s.temperature
  if s.top_k and s.top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, s.top_k)[0][..., -1:]
    x = jnp.where(x >= kth, x, -jnp.inf)
  if s.top_p < 1.0:
    desc = jnp.sort(x, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # Mass of the strictly more likely tokens.
    kept = jnp.where(before < s.top_p, desc, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)  # The least likely kept logit.
    x = jnp.where(x >= threshold, x, -jnp.inf)
  return x


def next_tokens(logits_bv: jax.Array, s: Sampling, seeds_b: jax.Array,
                counts_b: jax.Array) -> jax.Array:
  """The next token of each row [B] (int32): argmax, or a draw with the row's key
  `fold_in(key(seed), count)`."""
  if s.greedy:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  keys = jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.key(seed), n))(seeds_b, counts_b)
  draw = jax.vmap(jax.random.categorical)(keys, filtered_logits(logits_bv, s))
  return draw.astype(jnp.int32)
