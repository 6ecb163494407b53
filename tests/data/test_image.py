"""Tests of trace_jax.data.image against transformers' Qwen2-VL image processor.

The reference is `Qwen2VLImageProcessorPil` (what `transformers.Qwen2VLImageProcessor` resolves to
without torchvision), built with explicit arguments and no hub access. Our port uses the same
Pillow BICUBIC resize and the same float64 -> float32 rescale and float32 normalise steps, so
pixel values are compared for exact equality. Patch ordering is also checked against an explicit
index formula, independently of transformers.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image

from trace_jax.data import image as qimage

FACTOR = 28


@pytest.fixture(scope="module")
def hf():
  """transformers' qwen2_vl PIL image-processor module (skips the tests if it is missing)."""
  pytest.importorskip("transformers")
  from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl
  return image_processing_pil_qwen2_vl


def _reference(hf, image, min_pixels=qimage.MIN_PIXELS, max_pixels=qimage.MAX_PIXELS):
  processor = hf.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
  out = processor(images=image, return_tensors="np")
  return out["pixel_values"], out["image_grid_thw"][0]


def _rgb(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _images():
  """Named test images: odd sizes, grayscale, alpha, palette transparency, numpy inputs."""
  rng = np.random.default_rng(1)
  rgba = rng.integers(0, 256, (61, 47, 4), dtype=np.uint8)
  palette = Image.fromarray(_rgb(45, 70, seed=2)).convert("P")
  palette.info["transparency"] = 0
  return {
      "rgb_37x91": Image.fromarray(_rgb(37, 91)),
      "rgb_256x340": Image.fromarray(_rgb(256, 340, seed=3)),
      "rgb_500x120": Image.fromarray(_rgb(500, 120, seed=4)),
      "gray_L": Image.fromarray(rng.integers(0, 256, (83, 29), dtype=np.uint8), mode="L"),
      "rgba": Image.fromarray(rgba, mode="RGBA"),
      "palette_transparency": palette,
      "np_rgb": _rgb(50, 77, seed=5),
      "np_rgba": rgba,
  }


PIXEL_LIMITS = {
    "default": (qimage.MIN_PIXELS, qimage.MAX_PIXELS),
    "upscale": (40 * FACTOR * FACTOR, 80 * FACTOR * FACTOR),
    "downscale": (4 * FACTOR * FACTOR, 16 * FACTOR * FACTOR),
}


@pytest.mark.parametrize("limits", PIXEL_LIMITS)
def test_preprocess_matches_transformers(hf, limits):
  min_pixels, max_pixels = PIXEL_LIMITS[limits]
  for name, image in _images().items():
    want_pixels, want_grid = _reference(hf, image, min_pixels, max_pixels)
    got_pixels, got_grid = qimage.preprocess(image, min_pixels=min_pixels, max_pixels=max_pixels)
    np.testing.assert_array_equal(got_grid, want_grid, err_msg=name)
    assert got_pixels.dtype == np.float32 and got_pixels.shape == want_pixels.shape, name
    assert got_pixels.shape == (np.prod(got_grid), 3 * 2 * 14 * 14), name
    np.testing.assert_array_equal(got_pixels, want_pixels, err_msg=name)


def test_smart_resize_matches_transformers_on_a_grid(hf):
  sizes = [1, 2, 13, 14, 27, 28, 29, 41, 42, 55, 56, 57, 99, 140, 333, 1000, 1023, 3001]
  limits = [(qimage.MIN_PIXELS, qimage.MAX_PIXELS), (256 * 28 * 28, 1024 * 28 * 28),
            (28 * 28, 4 * 28 * 28), (3136, 12845056)]
  for (height, width), (lo, hi) in itertools.product(itertools.product(sizes, sizes), limits):
    try:
      want = hf.smart_resize(height, width, FACTOR, lo, hi)
    except ValueError as e:
      with pytest.raises(ValueError, match="aspect ratio must be smaller than 200") as got:
        qimage.smart_resize(height, width, FACTOR, lo, hi)
      assert str(got.value) == str(e)
      continue
    got = qimage.smart_resize(height, width, FACTOR, lo, hi)
    assert got == want, (height, width, lo, hi)
    assert got[0] % FACTOR == 0 and got[1] % FACTOR == 0 and min(got) >= FACTOR


def test_patch_order_follows_merge_blocks():
  patch, merge, temporal = 14, 2, 2
  height, width = 2 * 28, 3 * 28
  c, y, x = np.meshgrid(np.arange(3), np.arange(height), np.arange(width), indexing="ij")
  x_chw = (c * 1_000_000 + y * 1000 + x).astype(np.float32)
  pixels, grid = qimage.patchify(x_chw, patch, temporal, merge)
  grid_w = width // patch
  np.testing.assert_array_equal(grid, [1, height // patch, grid_w])
  rng = np.random.default_rng(0)
  for _ in range(200):
    bh, bw, mh, mw = rng.integers(0, 2), rng.integers(0, 3), rng.integers(0, 2), rng.integers(0, 2)
    ch, t, py, px = rng.integers(0, 3), rng.integers(0, 2), rng.integers(0, 14), rng.integers(0, 14)
    row = ((bh * (grid_w // merge) + bw) * merge + mh) * merge + mw
    col = ((ch * temporal + t) * patch + py) * patch + px
    yy, xx = (bh * merge + mh) * patch + py, (bw * merge + mw) * patch + px
    assert pixels[row, col] == x_chw[ch, yy, xx]


def test_resize_to_grid_stretches_to_the_bucket_grid(hf):
  image = Image.fromarray(_rgb(37, 91))
  pixels, grid = qimage.resize_to_grid(image, (4, 6))
  np.testing.assert_array_equal(grid, [1, 4, 6])
  assert pixels.shape == (24, 1176) and pixels.dtype == np.float32
  same, _ = qimage.preprocess(image, target_hw=(56, 84))
  np.testing.assert_array_equal(pixels, same)
  # Where smart_resize picks the same size, the fixed-size path equals the reference.
  square = Image.fromarray(_rgb(56, 84, seed=7))
  want, want_grid = _reference(hf, square, 112 * 168, 112 * 168)
  got, got_grid = qimage.resize_to_grid(square, (8, 12))
  np.testing.assert_array_equal(got_grid, want_grid)
  np.testing.assert_array_equal(got, want)


def test_path_and_bytes_inputs_equal_the_pil_input(tmp_path):
  image = Image.fromarray(_rgb(40, 66))
  path = tmp_path / "img.png"
  image.save(path)
  want, _ = qimage.preprocess(image)
  for source in (str(path), path, path.read_bytes()):
    got, _ = qimage.preprocess(source)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bad, named", [
    (None, "NoneType"),
    ([[0, 1], [2, 3]], "list"),
    (3.5, "float"),
    (np.zeros((8, 8, 3), np.float32), "float32"),
    (np.zeros((8, 8, 2), np.uint8), r"\(8, 8, 2\)"),
    (b"not an image at all", "19 bytes"),
    ("/nonexistent/cat.jpg", "/nonexistent/cat.jpg"),
])
def test_non_image_input_is_a_value_error_naming_it(bad, named):
  with pytest.raises(ValueError, match=named):
    qimage.preprocess(bad)


def test_truncated_file_is_a_value_error(tmp_path):
  buffer = io.BytesIO()
  Image.fromarray(_rgb(64, 64)).save(buffer, format="PNG")
  path = tmp_path / "cut.png"
  path.write_bytes(buffer.getvalue()[:100])
  with pytest.raises(ValueError, match="cut.png"):
    qimage.preprocess(str(path))


def test_extreme_aspect_ratio_is_a_value_error():
  with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
    qimage.preprocess(np.zeros((1, 201, 3), np.uint8))
  qimage.preprocess(np.zeros((1, 200, 3), np.uint8))  # 200 itself is allowed


@pytest.mark.parametrize("target_hw", [(0, 28), (28, 30), (14, 28)])
def test_bad_target_size_is_a_value_error(target_hw):
  with pytest.raises(ValueError, match="multiples of 28"):
    qimage.preprocess(_rgb(30, 30), target_hw=target_hw)


def test_bad_grid_is_a_value_error():
  with pytest.raises(ValueError, match="merge_size=2"):
    qimage.resize_to_grid(_rgb(30, 30), (3, 4))
