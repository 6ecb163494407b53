"""Qwen2-VL / Qwen2.5-VL image preprocessing in numpy and Pillow: RGB, resize, normalise, patchify.

A port of the Hugging Face image processor (transformers `models/qwen2_vl/
image_processing_pil_qwen2_vl.py`, `Qwen2VLImageProcessorPil`, and `smart_resize`): convert to RGB
(transparency composited onto white), resize with Pillow's BICUBIC to a multiple of
`patch_size * merge_size` (28 px), rescale by 1/255, normalise with the CLIP mean/std, repeat the
single frame `temporal_patch_size` times and flatten into 14x14 patches ordered so that each
`merge_size x merge_size` block of patches is contiguous (the order the vision merger expects).
The output equals the PIL backend's bit for bit. The torchvision backend (transformers' default
when torchvision is installed) resizes with torch's bicubic and differs by a few uint8 levels.

Two ways to pick the size:
- `preprocess(image)`: `smart_resize` keeps the aspect ratio and the pixel count within
  [min_pixels, max_pixels]; each image gets its own grid (what the reference processor does).
- `preprocess(image, target_hw=(h, w))` or `resize_to_grid(image, grid_hw)`: resize to one fixed
  size, ignoring the aspect ratio, so that every image of a training bucket has the same grid and
  the batch has a static shape. The image is stretched, not padded or cropped.

This module does not batch images, insert image tokens into text, compute rotary positions, or
run the vision tower.
"""

from __future__ import annotations

import io
import math
import os
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

# CLIP normalisation (transformers `image_utils.OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Defaults of `Qwen2VLImageProcessor`. The released Qwen2.5-VL `preprocessor_config.json` files set
# max_pixels=12845056 (16384 * 28 * 28); pass it explicitly to reproduce them.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 14 * 14 * 4 * 1280
PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2

# `smart_resize` refuses images whose long side is more than this many times the short side.
MAX_ASPECT_RATIO = 200

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike, bytes]


def smart_resize(height: int,
                 width: int,
                 factor: int = 28,
                 min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
  """Size to resize an image to: multiples of `factor`, area within [min_pixels, max_pixels].

  The aspect ratio is kept as closely as the rounding allows. Port of transformers
  `models/qwen2_vl/image_processing_qwen2_vl.py:smart_resize`, rounding included (Python's
  `round` is half-to-even).

  Args:
    height: Input height in pixels, >= 1.
    width: Input width in pixels, >= 1.
    factor: Both outputs are multiples of this (patch_size * merge_size).
    min_pixels: Lower bound on the output area.
    max_pixels: Upper bound on the output area.

  Returns:
    (resized_height, resized_width).

  Raises:
    ValueError: a side is < 1, or max(height, width) / min(height, width) > 200.
  """
  if height < 1 or width < 1:
    raise ValueError(f"image height and width must be >= 1, got {height}x{width}")
  if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
    raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
                     f"got {max(height, width) / min(height, width)}")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def _open(source: str | os.PathLike | bytes) -> Image.Image:
  """Opens and decodes an image file (path or encoded bytes), or raises ValueError."""
  what = f"{len(source)} bytes" if isinstance(source, bytes) else repr(os.fspath(source))
  try:
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    image.load()
  except (OSError, UnidentifiedImageError, ValueError) as e:
    raise ValueError(f"cannot read an image from {what}: {e}") from e
  return image


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
  """transformers `image_transforms.convert_to_rgb` for PIL: transparency onto white."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, rgba)
  return np.asarray(image.convert("RGB"))


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
  """transformers `image_transforms.convert_to_rgb` for uint8 channels-last arrays."""
  if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and
                                                             array.shape[-1] not in (1, 3, 4)):
    raise ValueError("expected a uint8 array of shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], "
                     f"got dtype {array.dtype} shape {array.shape}")
  if array.ndim == 2:
    array = array[:, :, None]
  if array.shape[-1] == 1:
    return np.repeat(array, 3, axis=-1)
  if array.shape[-1] == 4:
    alpha = array[..., 3:4] / 255
    return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
  return array


def to_rgb(image: ImageLike) -> np.ndarray:
  """Decodes `image` into RGB pixels, compositing any transparency onto white.

  Args:
    image: A PIL image (any mode), a uint8 channels-last array ([H, W], [H, W, 1|3|4]), a file path,
      or the encoded bytes of an image file.

  Returns:
    uint8 [H, W, 3].

  Raises:
    ValueError: `image` is none of the above, or the file cannot be decoded.
  """
  if isinstance(image, (str, os.PathLike, bytes)):
    image = _open(image)
  if isinstance(image, Image.Image):
    return _pil_to_rgb(image)
  if isinstance(image, np.ndarray):
    return _array_to_rgb(image)
  raise ValueError("expected a PIL image, a uint8 numpy array, a path or encoded bytes, "
                   f"got {type(image).__name__}: {image!r:.80}")


def _resize_normalize(rgb_hw3: np.ndarray, height: int, width: int) -> np.ndarray:
  """BICUBIC resize, rescale by 1/255 and CLIP normalisation, with the reference's dtypes.

  Args:
    rgb_hw3: uint8 [H, W, 3].
    height: Output height.
    width: Output width.

  Returns:
    float32 [3, height, width].
  """
  resized = Image.fromarray(rgb_hw3).resize((width, height), resample=Image.Resampling.BICUBIC)
  # Same precision steps as transformers `rescale` (float64 multiply, cast to float32) and
  # `normalize` (float32 subtract and divide), so the result matches bit for bit.
  x_hwc = (np.asarray(resized).astype(np.float64) * (1 / 255)).astype(np.float32)
  mean = np.asarray(CLIP_MEAN, np.float32)
  std = np.asarray(CLIP_STD, np.float32)
  return ((x_hwc - mean) / std).transpose(2, 0, 1)


def patchify(x_chw: np.ndarray,
             patch_size: int = PATCH_SIZE,
             temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
             merge_size: int = MERGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """Flattens one image into the Qwen2-VL patch sequence.

  The frame is repeated `temporal_patch_size` times (a still image is a one-step video). Patches
  are ordered block by block: each `merge_size x merge_size` group of neighbouring patches is
  contiguous, groups in row-major order; each row is (channel, time, patch row, patch column).
  Port of `Qwen2VLImageProcessorPil.patchify`.

  Args:
    x_chw: float [C, H, W]; H and W multiples of patch_size * merge_size.
    patch_size: Spatial patch side in pixels.
    temporal_patch_size: Frames per patch.
    merge_size: Side of the block of patches the vision merger fuses into one token.

  Returns:
    pixel_values: float32 [P, C * temporal_patch_size * patch_size**2], P = grid_h * grid_w.
    grid_thw: int64 [3], (1, grid_h, grid_w) with grid_h = H // patch_size.
  """
  channels, height, width = x_chw.shape
  factor = patch_size * merge_size
  if height % factor or width % factor:
    raise ValueError(f"image size {height}x{width} is not a multiple of {factor}")
  grid_h, grid_w = height // patch_size, width // patch_size
  x = np.asarray(x_chw, np.float32).reshape(channels, grid_h // merge_size, merge_size, patch_size,
                                            grid_w // merge_size, merge_size, patch_size)
  # -> (blocks_h, blocks_w, merge_h, merge_w, C, patch_h, patch_w)
  x = x.transpose(1, 4, 2, 5, 0, 3, 6)
  x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, *x.shape[5:]))
  pixel_values = x.reshape(grid_h * grid_w, channels * temporal_patch_size * patch_size**2)
  return pixel_values, np.array([1, grid_h, grid_w], np.int64)


def preprocess(image: ImageLike,
               *,
               min_pixels: int = MIN_PIXELS,
               max_pixels: int = MAX_PIXELS,
               patch_size: int = PATCH_SIZE,
               temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
               merge_size: int = MERGE_SIZE,
               target_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """One image -> Qwen2-VL `pixel_values` and `image_grid_thw`, as `Qwen2VLImageProcessorPil`.

  Args:
    image: See `to_rgb`.
    min_pixels: Lower bound on the resized area (ignored with `target_hw`).
    max_pixels: Upper bound on the resized area (ignored with `target_hw`).
    patch_size: Spatial patch side in pixels.
    temporal_patch_size: Frames per patch; the single frame is repeated this many times.
    merge_size: Side of the patch block fused into one token; sizes are multiples of
      patch_size * merge_size.
    target_hw: If given, resize to exactly (height, width) pixels, both multiples of
      patch_size * merge_size, whatever the aspect ratio (the image is stretched). For training
      buckets, where every image of a batch must have the same grid. If None, the size comes from
      `smart_resize`.

  Returns:
    pixel_values: float32 [P, 3 * temporal_patch_size * patch_size**2], P = grid_h * grid_w.
    grid_thw: int64 [3], (1, grid_h, grid_w), in patches; the image takes
      P // merge_size**2 tokens in the language model.

  Raises:
    ValueError: unreadable or non-image input, an aspect ratio over 200 (without `target_hw`), or a
      `target_hw` that is not a positive multiple of patch_size * merge_size.
  """
  rgb_hw3 = to_rgb(image)
  factor = patch_size * merge_size
  if target_hw is None:
    height, width = smart_resize(rgb_hw3.shape[0], rgb_hw3.shape[1], factor, min_pixels,
                                 max_pixels)
  else:
    height, width = target_hw
    if height < factor or width < factor or height % factor or width % factor:
      raise ValueError(f"target_hw must be positive multiples of {factor}, got {target_hw}")
  x_chw = _resize_normalize(rgb_hw3, height, width)
  return patchify(x_chw, patch_size, temporal_patch_size, merge_size)


def resize_to_grid(image: ImageLike,
                   grid_hw: tuple[int, int],
                   *,
                   patch_size: int = PATCH_SIZE,
                   temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
                   merge_size: int = MERGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """`preprocess` to a fixed patch grid, ignoring the aspect ratio (for training buckets).

  Args:
    image: See `to_rgb`.
    grid_hw: (grid_h, grid_w) in patches, as in `grid_thw[1:]`; both multiples of merge_size.
      The image is stretched to (grid_h * patch_size, grid_w * patch_size) pixels.
    patch_size: Spatial patch side in pixels.
    temporal_patch_size: Frames per patch.
    merge_size: Side of the patch block fused into one token.

  Returns:
    pixel_values: float32 [grid_h * grid_w, 3 * temporal_patch_size * patch_size**2].
    grid_thw: int64 [3], (1, grid_h, grid_w).

  Raises:
    ValueError: as `preprocess`, or a grid that is not a positive multiple of merge_size.
  """
  grid_h, grid_w = grid_hw
  if grid_h < merge_size or grid_w < merge_size or grid_h % merge_size or grid_w % merge_size:
    raise ValueError(
        f"grid_hw must be positive multiples of merge_size={merge_size}, got {grid_hw}")
  return preprocess(image,
                    patch_size=patch_size,
                    temporal_patch_size=temporal_patch_size,
                    merge_size=merge_size,
                    target_hw=(grid_h * patch_size, grid_w * patch_size))
