"""The Qwen2-VL / Qwen2.5-VL vision tower and patch merger (Flax NNX).

Ported from transformers `models/qwen2_vl/modeling_qwen2_vl.py`
(`Qwen2VisionTransformerPretrainedModel`) and `models/qwen2_5_vl/modeling_qwen2_5_vl.py`
(`Qwen2_5_VisionTransformerPretrainedModel`).
Patches arrive flat, [P, C*2*14*14], as the Hugging Face processor gives them; attention is
restricted to one frame (full blocks) or one window (Qwen2.5-VL window blocks) by segment ids.
It does not decide where image features go in the text sequence (see `qwen_vl.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trace_jax import sharding
from trace_jax.model.config import ModelConfig
from trace_jax.model.layers import (ACTIVATIONS, Dense, Norm, apply_rope, attention,
                                    inv_frequencies, scan_layers)
from trace_jax.model.positions import VisionLayout


class VisionBlocks(nnx.Module):
  """All `depth` vision blocks, stacked on a leading "layers" axis."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    v = cfg.vision
    self.gated = cfg.family == "qwen2_5_vl"
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs, stack=v.depth)
    norm_kw = dict(kind="rms" if self.gated else "layer", eps=v.norm_eps, dtype=cfg.compute_dtype,
                   param_dtype=cfg.weight_dtype, stack=v.depth)
    self.num_heads, self.act = v.num_heads, v.act
    self.norm1 = Norm(v.width, **norm_kw)
    self.norm2 = Norm(v.width, **norm_kw)
    self.qkv = Dense((v.width,), (3, v.num_heads, v.head_dim), ("vit_embed",),
                     (None, "heads", "head_dim"), use_bias=True, **kw)
    self.proj = Dense((v.num_heads, v.head_dim), (v.width,), ("heads", "head_dim"),
                      ("vit_embed",), use_bias=True, **kw)
    if self.gated:
      self.gate = Dense((v.width,), (v.mlp_dim,), ("vit_embed",), ("vit_mlp",), use_bias=True, **kw)
      self.up = Dense((v.width,), (v.mlp_dim,), ("vit_embed",), ("vit_mlp",), use_bias=True, **kw)
      self.down = Dense((v.mlp_dim,), (v.width,), ("vit_mlp",), ("vit_embed",), use_bias=True, **kw)
    else:
      self.fc1 = Dense((v.width,), (v.mlp_dim,), ("vit_embed",), ("vit_mlp",), use_bias=True, **kw)
      self.fc2 = Dense((v.mlp_dim,), (v.width,), ("vit_mlp",), ("vit_embed",), use_bias=True, **kw)

  def block(self, x_bpd, cos_ph, sin_ph, mask_pp):
    """One block on [B, P, D] patches (this module holding one layer's slice)."""
    qkv = self.qkv(self.norm1(x_bpd))  # [B, P, 3, N, H]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = apply_rope(q, cos_ph, sin_ph), apply_rope(k, cos_ph, sin_ph)
    x_bpd = x_bpd + self.proj(attention(q, k, v, mask_pp[None]))
    h = self.norm2(x_bpd)
    act = ACTIVATIONS[self.act]
    h = self.down(act(self.gate(h)) * self.up(h)) if self.gated else self.fc2(act(self.fc1(h)))
    return x_bpd + h


class VisionTower(nnx.Module):
  """Patch embedding, 2-D RoPE, the blocks and the 2x2 merger; returns [P/4, decoder width]."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    v = cfg.vision
    self.cfg = cfg
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
    # The Conv3d with stride == kernel is a matmul over the flattened (C, T, H, W) patch.
    self.patch_embed = Dense((v.patch_dim,), (v.width,), ("vit_patch",), ("vit_embed",),
                             use_bias=False, **kw)
    self.blocks = VisionBlocks(cfg, rngs)
    unit = v.spatial_merge_size**2
    self.merger_norm = Norm(v.width, kind="rms" if cfg.family == "qwen2_5_vl" else "layer",
                            eps=1e-6, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    self.merger_fc1 = Dense((unit, v.width), (unit * v.width,), (None, "vit_embed"), ("vit_mlp",),
                            use_bias=True, **kw)
    self.merger_fc2 = Dense((unit * v.width,), (v.out_width,), ("vit_mlp",), ("embed",),
                            use_bias=True, **kw)

  def __call__(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
    """Merged image features of the patches described by `layout`.

    pixel_values: [P, C*T*14*14] (the processor's flat format; returns [P/4, out_width]) or
    [B, P, C*T*14*14] (B images of one grid, `layout` of one image; returns [B, P/4, out_width]).
    """
    if pixel_values.ndim == 2:
      return self(pixel_values[None], layout)[0]
    v = self.cfg.vision
    unit = v.spatial_merge_size**2
    b, p = pixel_values.shape[:2]

    def to_tower_order(a, axis):  # Permute merged units into window order (identity: Qwen2-VL).
      shape = a.shape
      a = a.reshape(*shape[:axis], p // unit, unit, *shape[axis + 1:])
      return jnp.take(a, layout.window_index, axis=axis).reshape(shape)

    x = to_tower_order(self.patch_embed(pixel_values), 1)
    x = sharding.constrain(x, ("act_batch", "act_patches", "act_embed"))
    inv = inv_frequencies(v.head_dim // 2, v.rope_theta)
    freqs = (layout.rot_pos_p2[..., None].astype(jnp.float32) * inv).reshape(p, -1)
    freqs = to_tower_order(jnp.concatenate([freqs, freqs], axis=-1), 0)
    cos, sin = jnp.cos(freqs), jnp.sin(freqs)
    full = layout.segment_full[:, None] == layout.segment_full[None, :]
    window = layout.segment_window[:, None] == layout.segment_window[None, :]

    def body(layer, x, is_full):
      mask = jnp.where(is_full, full, window)
      return layer.block(x, cos, sin, mask), None

    # Qwen2-VL attends over whole frames in every block; Qwen2.5-VL only in `fullatt_block_indexes`.
    is_full = np.array([self.cfg.family == "qwen2_vl" or i in v.fullatt_block_indexes
                        for i in range(v.depth)])
    x, _ = scan_layers(self.blocks, body, x, jnp.asarray(is_full), self.cfg.remat)
    x = self.merger_norm(x).reshape(b, p // unit, unit, v.width)
    x = self.merger_fc2(jax.nn.gelu(self.merger_fc1(x), approximate=False))
    x = jnp.take(x, layout.reverse_index, axis=1)
    return sharding.constrain(x, ("act_batch", "act_patches", "act_embed"))
