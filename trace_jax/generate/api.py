"""Plain functions over inputs in the Hugging Face processor's format: `generate` (what
transformers' `generate` returns, through the engine) and `score` (log-probabilities of given
continuations, e.g. a verifier's "yes"). Neither keeps state between calls.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trace_jax.generate.engine import Engine
from trace_jax.generate.programs import prefill
from trace_jax.generate.sampling import Sampling, next_tokens
from trace_jax.model.qwen_vl import QwenVL, prepare_positions


def generate(model: QwenVL, input_ids: Any, attention_mask: Any = None, *,
             pixel_values: Any = None, image_grid_thw: Any = None, max_new_tokens: int,
             stop_ids: Sequence[int] = (), temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, chunk: int = 16) -> list[list[int]]:
  """New tokens of each row, up to and including its first stop id (at most `max_new_tokens`).

  Args:
    input_ids, attention_mask: [B, T], left-padded as transformers pads for generation (right
      padding works too).
    pixel_values, image_grid_thw: the processor's flat [P, C*2*14*14] patches and [I, 3] grids.
    temperature, top_k, top_p: 0 is greedy; otherwise a draw from the filtered distribution,
      row i with seed `seed + i` (its output does not depend on the other rows).
    chunk: decoding steps per on-device loop.
  Returns:
    One list of token ids per row.
  """
  ids = np.asarray(input_ids, np.int32)
  mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
  b, t = ids.shape
  prepared = prepare_positions(model.cfg, ids, mask, image_grid_thw)
  last = t - 1 - np.argmax(mask[:, ::-1] > 0, axis=1)  # Each row's last real token.
  pixels = None if pixel_values is None else jnp.asarray(pixel_values)
  h, logits, cache = prefill(*nnx.split(model), jnp.asarray(ids), jnp.asarray(mask),
                             jnp.asarray(prepared["position_ids"]), pixels,
                             prepared.get("vision_layout"), jnp.asarray(last), max_len=t)
  del h
  sampling = Sampling(temperature, top_k, top_p)
  seeds = (seed + np.arange(b)).astype(np.int32)
  first = np.asarray(next_tokens(logits, sampling, jnp.asarray(seeds), jnp.zeros(b, jnp.int32)))
  out: list[list[int]] = [[int(x)] for x in first]
  go = np.flatnonzero(~np.isin(first, list(stop_ids)))
  if max_new_tokens > 1 and len(go):
    engine = Engine(model, capacity=b, cache_len=t + max_new_tokens,
                    max_new_tokens=max_new_tokens, stop_ids=stop_ids, sampling=sampling,
                    chunk=chunk)
    engine.submit(cache, go, np.full(len(go), t), first[go], seeds[go], list(go))
    for f in engine.drain():
      out[f.tag] = f.tokens
  return out


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_logprobs(graphdef, state, ids, mask, positions, pixels, layout, at, targets):
  """log p(targets[b, j] | the sequence up to position at[b, j]) [B, C]."""
  model = nnx.merge(graphdef, state)
  h = model(ids, mask, pixels, position_ids=positions, vision_layout=layout,
            return_logits=False).hidden_states
  h = jnp.take_along_axis(h, at[..., None], axis=1)
  logp = jax.nn.log_softmax(model.logits(h), axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def score(model: QwenVL, input_ids: Any, attention_mask: Any, continuation_mask: Any, *,
          pixel_values: Any = None, image_grid_thw: Any = None) -> np.ndarray:
  """Summed log-probability [B] (float32) of each row's continuation tokens: those where
  `continuation_mask` [B, T] is 1, each given everything before it (one forward pass; logits
  only at those positions, never [B, T, V])."""
  ids = np.asarray(input_ids, np.int32)
  mask = np.asarray(attention_mask, np.int32)
  cont = np.asarray(continuation_mask) > 0
  if cont[:, 0].any():
    raise ValueError("a continuation token at position 0 has nothing to be predicted from")
  c = max(int(cont.sum(axis=1).max()), 1)
  at = np.zeros((ids.shape[0], c), np.int32)
  targets = np.zeros_like(at)
  weight = np.zeros(at.shape, np.float32)
  for r, row in enumerate(cont):
    pos = np.flatnonzero(row)
    at[r, :len(pos)], targets[r, :len(pos)], weight[r, :len(pos)] = pos - 1, ids[r, pos], 1.0
  prepared = prepare_positions(model.cfg, ids, mask, image_grid_thw)
  pixels = None if pixel_values is None else jnp.asarray(pixel_values)
  logp = _token_logprobs(*nnx.split(model), jnp.asarray(ids), jnp.asarray(mask),
                         jnp.asarray(prepared["position_ids"]), pixels,
                         prepared.get("vision_layout"), jnp.asarray(at), jnp.asarray(targets))
  return (np.asarray(logp) * weight).sum(axis=1)
