"""Prompt batches for the model: token lists padded into a length bucket, their M-RoPE positions
and their images' pixels, as the encoder and the generation engine prefill them.

Every image of a batch has one patch grid (resized to it by the caller), so batches have static
shapes and few programs compile; a batch in which no row has an image carries no pixels and
runs no vision tower. `on_devices` places a batch on a mesh, rows split over its batch axes.
This module runs no model.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trace_jax import sharding
from trace_jax.model.config import ModelConfig
from trace_jax.model.positions import VisionLayout, rope_index, vision_layout


@dataclasses.dataclass(frozen=True)
class Packed:
  """A padded prompt batch (right-padded; rows past the real ones are filler)."""

  ids: np.ndarray  # [B, T] int32
  mask: np.ndarray  # [B, T] int32
  positions: np.ndarray  # [3, B, T] int32
  pixels: np.ndarray | None  # [B, P, C] float32; None when no row has an image.
  rows: int  # Real rows.

  @property
  def lengths(self) -> np.ndarray:
    """[B] tokens of each row (filler rows count their one visible token)."""
    return self.mask.sum(axis=1)


def bucket(n: int) -> int:
  """The smallest power of two >= n."""
  return 1 << max(n - 1, 0).bit_length()


def length_bucket(longest: int, buckets: Sequence[int], grow: bool = False) -> int:
  """The smallest of `buckets` that holds `longest` tokens; past them, the next power of two
  when `grow`, else a ValueError."""
  t = next((b for b in sorted(buckets) if b >= longest), bucket(longest) if grow else None)
  if t is None:
    raise ValueError(f"a prompt of {longest} tokens exceeds the largest bucket "
                     f"{tuple(sorted(buckets))}")
  return t


def image_layout(cfg: ModelConfig, grid: Sequence[int]) -> VisionLayout:
  """The vision layout of one image of `grid` (every row of a batch shares it)."""
  return vision_layout(np.asarray([tuple(grid)]), cfg.vision, windowed=cfg.family == "qwen2_5_vl")


def pack(seqs: Sequence[Sequence[int]], images: Sequence[np.ndarray | None], cfg: ModelConfig,
         grid: Sequence[int] | None, batch_size: int, buckets: Sequence[int],
         grow: bool = False, offset: int = 0) -> Packed:
  """Up to `batch_size` token lists (and, per row, the [P, C] pixels of its image at `grid`, or
  None) padded to the smallest bucket that fits (`length_bucket`). `offset`: the sequences
  continue `offset` text tokens already in a cache (a shared prefix): their M-RoPE positions
  start there."""
  t = length_bucket(max(map(len, seqs)), buckets, grow)
  ids, mask = np.zeros((batch_size, t), np.int32), np.zeros((batch_size, t), np.int32)
  positions = np.zeros((3, batch_size, t), np.int32)
  for i, (s, image) in enumerate(zip(seqs, images)):
    ids[i, :len(s)], mask[i, :len(s)] = s, 1
    g = None if image is None else np.asarray([tuple(grid)])
    positions[:, i, :len(s)] = rope_index(np.asarray([s]), None, g, cfg)[:, 0] + offset
  mask[len(seqs):, 0] = 1  # Filler rows: one visible token keeps their softmax defined.
  pixels = None
  if any(image is not None for image in images):
    pixels = np.zeros((batch_size, int(np.prod(grid)), cfg.vision.patch_dim), np.float32)
    for i, image in enumerate(images):
      if image is not None:
        pixels[i] = image
  return Packed(ids, mask, positions, pixels, len(seqs))


def on_devices(packed: Packed, mesh: jax.sharding.Mesh | None) -> tuple:
  """(ids, mask, positions, pixels) on the devices: rows split over the mesh's batch axes (the
  `act_batch` rule), or JAX's default placement without a mesh."""
  if mesh is None:
    return (jnp.asarray(packed.ids), jnp.asarray(packed.mask), jnp.asarray(packed.positions),
            None if packed.pixels is None else jnp.asarray(packed.pixels))
  put = lambda x, names: sharding.put(x, mesh, names)  # noqa: E731
  return (put(packed.ids, ("act_batch", None)), put(packed.mask, ("act_batch", None)),
          put(packed.positions, (None, "act_batch", None)),
          None if packed.pixels is None else put(packed.pixels, ("act_batch", None, None)))
