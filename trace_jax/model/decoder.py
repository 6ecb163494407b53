"""The Qwen2 decoder with multimodal RoPE and a KV cache (Flax NNX).

Ported from transformers `models/qwen2_5_vl/modeling_qwen2_5_vl.py` (`Qwen2_5_VLTextModel`,
`Qwen2_5_VLAttention`, `Qwen2_5_VLRotaryEmbedding`); Qwen2-VL's decoder is the same network.
Grouped-query attention with q/k/v bias, RMSNorm, SwiGLU; layers stacked and run with `lax.scan`.
It embeds nothing and computes no logits (see `qwen_vl.py`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trace_jax import sharding
from trace_jax.model.config import ModelConfig
from trace_jax.model.layers import Dense, Norm, apply_rope, attention, inv_frequencies, scan_layers


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of every layer for S slots, plus what decoding needs to continue."""

  k_lbksh: jax.Array  # [layers, batch, KV heads, slots, head dim]: each head's slots contiguous.
  v_lbksh: jax.Array
  valid_bs: jax.Array  # True where a slot holds a real (non-padding) token.
  # The next slot to write: a scalar int32 (every row writes at the same slot: prefill) or [B]
  # (each row at its own: rows that joined a decode batch at different times, as a generation
  # engine's slots do; a row's cache then never needs more than its prompt plus its output).
  index: jax.Array
  next_position_b: jax.Array  # M-RoPE position of the next token (all three components equal).

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, per_row: bool = False
            ) -> "KVCache":
    t = cfg.text
    shape = (t.num_layers, batch, t.num_kv_heads, max_len, t.head_dim)
    return cls(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype),
               jnp.zeros((batch, max_len), bool),
               jnp.zeros((batch,) if per_row else (), jnp.int32), jnp.zeros((batch,), jnp.int32))


def mrope_cos_sin(positions_3bt: jax.Array, head_dim: int, theta: float,
                  mrope_section: tuple[int, int, int]) -> tuple[jax.Array, jax.Array]:
  """cos/sin [B, T, H]: frequency band j uses the temporal, height or width position by section."""
  inv = inv_frequencies(head_dim, theta)  # [H/2]
  freqs = positions_3bt[..., None].astype(jnp.float32) * inv  # [3, B, T, H/2]
  which = np.repeat(np.arange(3), mrope_section)  # [H/2]: 0 = t, 1 = h, 2 = w.
  freqs = jnp.where(which == 0, freqs[0], jnp.where(which == 1, freqs[1], freqs[2]))
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


class DecoderBlocks(nnx.Module):
  """All decoder layers, stacked on a leading "layers" axis."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    t = cfg.text
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs, stack=t.num_layers)
    norm_kw = dict(kind="rms", eps=t.rms_norm_eps, dtype=cfg.compute_dtype,
                   param_dtype=cfg.weight_dtype, stack=t.num_layers)
    self.input_norm = Norm(t.width, **norm_kw)
    self.post_attn_norm = Norm(t.width, **norm_kw)
    self.q = Dense((t.width,), (t.num_heads, t.head_dim), ("embed",), ("heads", "head_dim"),
                   use_bias=True, **kw)
    self.k = Dense((t.width,), (t.num_kv_heads, t.head_dim), ("embed",), ("kv_heads", "head_dim"),
                   use_bias=True, **kw)
    self.v = Dense((t.width,), (t.num_kv_heads, t.head_dim), ("embed",), ("kv_heads", "head_dim"),
                   use_bias=True, **kw)
    self.o = Dense((t.num_heads, t.head_dim), (t.width,), ("heads", "head_dim"), ("embed",),
                   use_bias=False, **kw)
    self.gate = Dense((t.width,), (t.mlp_dim,), ("embed",), ("mlp",), use_bias=False, **kw)
    self.up = Dense((t.width,), (t.mlp_dim,), ("embed",), ("mlp",), use_bias=False, **kw)
    self.down = Dense((t.mlp_dim,), (t.width,), ("mlp",), ("embed",), use_bias=False, **kw)

  def block(self, x_btd, cos_bth, sin_bth, mask_bts, kv=None, key=None):
    """One layer. `kv` = (k_lbksh, v_lbksh, layer, index): the whole cache; this step's keys and
    values are written into slots `index`... of layer `layer` in place, and the returned (k, v)
    is the updated whole cache; `key` feeds adapter dropout (one key per projection)."""
    keys = [None] * 7 if key is None else list(jax.random.split(key, 7))
    h = self.input_norm(x_btd)
    q = apply_rope(self.q(h, key=keys[0]), cos_bth, sin_bth)
    k = apply_rope(self.k(h, key=keys[1]), cos_bth, sin_bth)
    v = self.v(h, key=keys[2])
    q = sharding.constrain(q, ("act_batch", "act_len", "act_heads", None))
    if kv is None:
      out = attention(q, k, v, mask_bts)
    else:
      k_all, v_all, layer, index = kv
      k_all, v_all = _write(k_all, k, layer, index), _write(v_all, v, layer, index)
      out = attention(q, jax.lax.dynamic_index_in_dim(k_all, layer, keepdims=False),
                      jax.lax.dynamic_index_in_dim(v_all, layer, keepdims=False), mask_bts,
                      kv_layout="bksh")
      k, v = k_all, v_all  # Returned: the whole updated cache.
    x_btd = x_btd + self.o(out, key=keys[3])
    h = self.post_attn_norm(x_btd)
    h = sharding.constrain(jax.nn.silu(self.gate(h, key=keys[4])) * self.up(h, key=keys[5]),
                           ("act_batch", "act_len", "act_mlp"))
    x_btd = x_btd + self.down(h, key=keys[6])
    return sharding.constrain(x_btd, ("act_batch", "act_len", "act_embed")), (k, v)


def _write(cache_lbksh: jax.Array, new_btkh: jax.Array, layer, index: jax.Array) -> jax.Array:
  """The cache with this step's [B, T, K, H] keys (or values) written in place at slots
  `index`... of layer `layer`: one slice for a scalar index, a scatter for one index per row."""
  new = new_btkh.astype(cache_lbksh.dtype)
  if index.ndim == 0:  # As [1, B, K, T, H] at (layer, 0, 0, index, 0).
    return jax.lax.dynamic_update_slice(cache_lbksh, jnp.swapaxes(new, 1, 2)[None],
                                        (layer, 0, 0, index, 0))
  if not _on_mesh():  # A scatter at (row, slot) pairs, in place.
    b, t = new.shape[:2]
    slots = index[:, None] + jnp.arange(t)[None]  # [B, T]: advanced indices select [B, T, K, H].
    return cache_lbksh.at[layer, jnp.arange(b)[:, None], :, slots, :].set(new, mode="drop")
  # On a mesh, mapped over the rows: the scatter then has a batching dimension, which GSPMD splits
  # like the rows (the plain scatter gathers the whole cache to every device first; XLA:CPU,
  # though, copies the cache for the mapped one, 2x the decode step on one device). A row past
  # its last slot (a finished row an engine still steps) then overwrites its last slots (the
  # start is clamped); such a row's outputs are discarded.
  row = lambda c, n, i: jax.lax.dynamic_update_slice(  # noqa: E731
    c, jnp.swapaxes(n, 0, 1)[None], (layer, 0, i, 0))
  return jax.vmap(row, in_axes=(1, 0, 0), out_axes=1)(cache_lbksh, new, index)


def _set_rows(valid_bs: jax.Array, valid_bt: jax.Array, index: jax.Array) -> jax.Array:
  """`valid_bs` with each row's [T] new entries at its `index` (as `_write` places them)."""
  if not _on_mesh():
    slots = index[:, None] + jnp.arange(valid_bt.shape[1])[None]
    return valid_bs.at[jnp.arange(valid_bs.shape[0])[:, None], slots].set(valid_bt, mode="drop")
  return jax.vmap(lambda v, n, i: jax.lax.dynamic_update_slice(v, n, (i,)))(
    valid_bs, valid_bt, index)


def _on_mesh() -> bool:
  """Whether the program being traced runs on a mesh of several devices (`jax.set_mesh`)."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and mesh.size > 1


class Decoder(nnx.Module):
  """Decoder layers and the final RMSNorm, over input embeddings."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.layers = DecoderBlocks(cfg, rngs)
    self.norm = Norm(cfg.text.width, kind="rms", eps=cfg.text.rms_norm_eps,
                     dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)

  def __call__(self, x_btd: jax.Array, positions_3bt: jax.Array, valid_bt: jax.Array,
               cache: KVCache | None = None, dropout_rng: jax.Array | None = None
               ) -> tuple[jax.Array, KVCache | None]:
    """Returns the final-norm hidden states [B, T, D] and the updated cache (if one was given).

    `dropout_rng` (training only, not with a cache) gives each layer its own adapter-dropout key.
    """
    t = self.cfg.text
    b, n = valid_bt.shape
    cos, sin = mrope_cos_sin(positions_3bt, t.head_dim, t.rope_theta, t.mrope_section)
    if cache is None:
      causal = jnp.tril(jnp.ones((n, n), bool))
      mask = causal[None] & valid_bt[:, None, :]
      keys = None if dropout_rng is None else jax.random.split(dropout_rng, t.num_layers)

      def body(layer, x, key):
        return layer.block(x, cos, sin, mask, key=key)[0], None

      x, _ = scan_layers(self.layers, body, x_btd, keys, self.cfg.remat)
      return self._final_norm(x), None

    slots = cache.valid_bs.shape[1]
    if cache.index.ndim == 0:
      valid = jax.lax.dynamic_update_slice_in_dim(cache.valid_bs, valid_bt, cache.index, axis=1)
      query_slot = jnp.broadcast_to(cache.index + jnp.arange(n), (b, n))
    else:
      query_slot = cache.index[:, None] + jnp.arange(n)[None]  # [B, T]
      valid = _set_rows(cache.valid_bs, valid_bt, cache.index)
    mask = (jnp.arange(slots)[None, None, :] <= query_slot[:, :, None]) & valid[:, None, :]

    # The cache rides in the carry and each layer updates its slots in place (as scanned inputs
    # and outputs, the whole cache would be copied on every call, i.e. every decoding step).
    def body_cached(layer, carry, i):
      x, k_all, v_all = carry
      x, (k_all, v_all) = layer.block(x, cos, sin, mask, (k_all, v_all, i, cache.index))
      return (x, k_all, v_all), None

    (x, k_all, v_all), _ = scan_layers(self.layers, body_cached,
                                       (x_btd, cache.k_lbksh, cache.v_lbksh),
                                       jnp.arange(t.num_layers), self.cfg.remat)
    last_pos = jnp.max(jnp.where(valid_bt[None], positions_3bt, -1), axis=(0, 2))
    next_pos = jnp.where(jnp.any(valid_bt, axis=1), last_pos + 1, cache.next_position_b)
    new_cache = KVCache(k_all, v_all, valid, cache.index + n, next_pos.astype(jnp.int32))
    return self._final_norm(x), new_cache

  def _final_norm(self, x_btd):
    return sharding.constrain(self.norm(x_btd), ("act_batch", "act_len", "act_embed"))
