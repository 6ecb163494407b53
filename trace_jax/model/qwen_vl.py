"""The multimodal model: token embedding, vision tower, image-feature merge, decoder, unembedding.

Mirrors transformers' `Qwen2_5_VLForConditionalGeneration` / `Qwen2VLForConditionalGeneration`
for image inputs, with the Hugging Face processor's input format. It returns logits and final-norm
hidden states and never computes a loss (see `trace_jax/train/`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trace_jax import sharding
from trace_jax.model.config import ModelConfig
from trace_jax.model.decoder import Decoder, KVCache
from trace_jax.model.layers import Dense, _param
from trace_jax.model.positions import VisionLayout, rope_index, vision_layout
from trace_jax.model.vision import VisionTower


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelOutput:
  logits: jax.Array | None  # [B, T, V] float32, or None when not requested.
  hidden_states: jax.Array  # [B, T, D] last layer, after the final RMSNorm.
  cache: KVCache | None = None


def prepare_positions(cfg: ModelConfig, input_ids: Any, attention_mask: Any = None,
                      image_grid_thw: Any = None) -> dict[str, Any]:
  """Host-side inputs the jitted model needs: M-RoPE `position_ids` and the `vision_layout`."""
  try:
    ids = np.asarray(input_ids)
    mask = None if attention_mask is None else np.asarray(attention_mask)
    grid = None if image_grid_thw is None else np.asarray(image_grid_thw)
  except jax.errors.TracerArrayConversionError:
    raise ValueError("under jit, pass position_ids (and vision_layout when there are images) "
                     "computed by trace_jax.model.prepare_positions outside the jitted function"
                     ) from None
  out = {"position_ids": rope_index(ids, mask, grid, cfg)}
  if grid is not None:
    out["vision_layout"] = vision_layout(grid, cfg.vision, windowed=cfg.family == "qwen2_5_vl")
  return out


class QwenVL(nnx.Module):
  """Qwen2-VL or Qwen2.5-VL (chosen by `cfg.family`)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    t = cfg.text
    self.cfg = cfg
    self.embed = _param(rngs, (t.vocab_size, t.width), ("vocab", "embed"), cfg.weight_dtype,
                        "normal")
    self.visual = VisionTower(cfg, rngs)
    self.decoder = Decoder(cfg, rngs)
    self.lm_head = None if t.tie_embeddings else Dense(
      (t.width,), (t.vocab_size,), ("embed",), ("vocab",), use_bias=False,
      dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
    # Trainable rows of added tokens over a frozen vocabulary (`token_rows.attach`, LoRA runs).
    self.token_rows = nnx.data(None)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               pixel_values: jax.Array | None = None, image_grid_thw: Any = None, *,
               position_ids: jax.Array | None = None, vision_layout: VisionLayout | None = None,
               cache: KVCache | None = None, return_logits: bool = True,
               dropout_rng: jax.Array | None = None) -> ModelOutput:
    """Forward pass over [B, T] tokens and the patches of their images.

    pixel_values: [P, C*2*14*14] for all images in order (the Hugging Face processor's format),
    or [B, P, C*2*14*14] with one image of one grid per row (training buckets; `vision_layout`
    then describes one image).

    `position_ids` [3, B, T] and `vision_layout` are computed from the concrete inputs when not
    given (outside jit); with `cache`, keys and values are written at `cache.index`.
    """
    if position_ids is None or (pixel_values is not None and vision_layout is None):
      prepared = prepare_positions(self.cfg, input_ids, attention_mask, image_grid_thw)
      position_ids = prepared["position_ids"] if position_ids is None else position_ids
      vision_layout = prepared.get("vision_layout") if vision_layout is None else vision_layout
    input_ids = jnp.asarray(input_ids)
    valid = (jnp.ones(input_ids.shape, bool) if attention_mask is None
             else jnp.asarray(attention_mask) > 0)
    x = self.embed_tokens(input_ids)
    if pixel_values is not None:
      feats = self.visual(jnp.asarray(pixel_values), vision_layout)
      x = merge_image_features(x, input_ids == self.cfg.image_token_id, feats)
    h, cache = self.decoder(x, jnp.asarray(position_ids), valid, cache, dropout_rng)
    return ModelOutput(self.logits(h) if return_logits else None, h, cache)

  def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
    # Gather the FSDP-sharded width first (as every FSDP weight is), keep vocab split: a lookup
    # from a width-sharded table would otherwise fight the batch sharding of the output.
    table = sharding.constrain(self.embedding_table().astype(self.cfg.compute_dtype),
                               ("vocab", None))
    x = jnp.take(table, input_ids, axis=0)
    return sharding.constrain(x, ("act_batch", "act_len", "act_embed"))

  def embedding_table(self) -> jax.Array:
    """`embed` [V, D], with the added tokens' trainable rows when it has them (`token_rows`)."""
    table = self.embed[...]
    return table if self.token_rows is None else self.token_rows.over_embed(table)

  def unembedding(self) -> jax.Array:
    """The output projection [D, V] in the compute dtype (tied to `embed`, or `lm_head`)."""
    if self.lm_head is None:
      w = self.embedding_table().T
    else:
      w = self.lm_head.kernel[...]
      w = w if self.token_rows is None else self.token_rows.over_head(w)
    return w.astype(self.cfg.compute_dtype)

  def logits(self, h_btd: jax.Array) -> jax.Array:
    """Float32 logits [..., V] of hidden states."""
    return jnp.dot(h_btd.astype(self.cfg.compute_dtype), self.unembedding(),
                   preferred_element_type=jnp.float32)

  def prefill(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
              max_len: int, **kw) -> ModelOutput:
    """Runs the prompt through a fresh cache of `max_len` slots."""
    cache = KVCache.zeros(self.cfg, np.shape(input_ids)[0], max_len)
    return self(input_ids, attention_mask, pixel_values, image_grid_thw, cache=cache, **kw)

  def decode(self, token_ids_b1: jax.Array, cache: KVCache) -> ModelOutput:
    """One greedy-decoding step: [B, 1] new tokens at each row's next M-RoPE position."""
    positions = jnp.broadcast_to(cache.next_position_b[None, :, None], (3, *token_ids_b1.shape))
    return self(token_ids_b1, position_ids=positions, cache=cache)


def merge_image_features(x_btd: jax.Array, is_image_bt: jax.Array, feats: jax.Array):
  """Writes image features over the image-token embeddings.

  feats [I, D] (flat): the i-th row goes to the i-th image token in row-major (B, T) order.
  feats [B, I, D] (one image per row): row b's i-th image token takes feats[b, i]; rows without
  image tokens ignore theirs.
  """
  b, t, d = x_btd.shape
  if feats.ndim == 2:
    idx = jnp.clip(jnp.cumsum(is_image_bt.reshape(-1)) - 1, 0, feats.shape[0] - 1)
    gathered = feats[idx].reshape(b, t, d)
  else:
    idx = jnp.clip(jnp.cumsum(is_image_bt, axis=1) - 1, 0, feats.shape[1] - 1)
    gathered = jnp.take_along_axis(feats, idx[..., None], axis=1)
  return jnp.where(is_image_bt[..., None], gathered.astype(x_btd.dtype), x_btd)
