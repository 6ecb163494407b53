"""The training format (one image per row, [B, P, C] pixels) equals the processor's flat format."""

import numpy as np

from tests.model import tiny
from trace_jax.model import prepare_positions
from trace_jax.model.positions import vision_layout


def test_batched_pixels_equal_flat():
  model = tiny.model()
  batch = tiny.batch(padding="left", grids=((1, 4, 8),))
  flat = model(**batch)
  cfg = model.cfg
  positions = prepare_positions(cfg, batch["input_ids"], batch["attention_mask"],
                                batch["image_grid_thw"])["position_ids"]
  one_image = vision_layout(batch["image_grid_thw"][:1], cfg.vision, windowed=True)
  pixels = batch["pixel_values"].reshape(2, -1, batch["pixel_values"].shape[-1])
  batched = model(batch["input_ids"], batch["attention_mask"], pixels, position_ids=positions,
                  vision_layout=one_image)
  valid = batch["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(batched.logits)[valid], np.asarray(flat.logits)[valid],
                             atol=1e-5)
