"""trace_jax's model equals transformers' on tiny random checkpoints (float32, 1e-4)."""

import numpy as np
import pytest

from tests.model import reference
from tests.model.reference import Case
from trace_jax.model.hf_io import load_hf

CASES = [
  # Window attention with several windows (56 px = 2x2 merged cells), one non-square image.
  Case("v25_kv2_untied_nonsquare", "qwen2_5_vl", kv_heads=2, tie=False, grids=((1, 6, 12),)),
  # Two images of different sizes in one sequence, tied embeddings, MQA, left padding.
  Case("v25_kv1_tied_two_images_left", "qwen2_5_vl", kv_heads=1, tie=True,
       grids=((1, 4, 4), (1, 8, 6)), images_per_row=2, padding="left"),
  Case("v25_kv4_text_only", "qwen2_5_vl", kv_heads=4, tie=False, grids=(), images_per_row=0),
  Case("v2_kv2_untied_nonsquare", "qwen2_vl", kv_heads=2, tie=False, grids=((1, 4, 8),)),
  Case("v2_kv1_tied_two_images", "qwen2_vl", kv_heads=1, tie=True,
       grids=((1, 4, 4), (1, 6, 4)), images_per_row=2),
  Case("v2_kv4_text_only_left", "qwen2_vl", kv_heads=4, tie=True, grids=(), images_per_row=0,
       padding="left"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_transformers(case, tmp_path):
  ref = reference.hf_model(case)
  ref.save_pretrained(tmp_path)
  batch = reference.inputs(case)
  want_logits, want_hidden = reference.hf_forward(ref, batch)

  model, cfg = load_hf(str(tmp_path), dtype="float32")
  assert cfg.family == case.family and cfg.text.tie_embeddings == case.tie
  out = model(**batch)
  valid = batch["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(out.logits)[valid], want_logits[valid], atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(out.hidden_states)[valid], want_hidden[valid], atol=1e-4,
                             rtol=0)


def test_rope_index_matches_transformers(tmp_path):
  """Position ids with two images, padding on the left: the reference `get_rope_index`."""
  import torch
  case = CASES[1]
  ref = reference.hf_model(case)
  batch = reference.inputs(case)
  want, _ = ref.model.get_rope_index(
    torch.tensor(batch["input_ids"]), torch.tensor(batch["input_ids"] == reference.IMAGE).long(),
    image_grid_thw=torch.tensor(batch["image_grid_thw"]),
    attention_mask=torch.tensor(batch["attention_mask"]))
  ref.save_pretrained(tmp_path)
  model, _ = load_hf(str(tmp_path), dtype="float32")
  from trace_jax.model.positions import rope_index
  got = rope_index(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], model.cfg)
  valid = batch["attention_mask"].astype(bool)
  np.testing.assert_array_equal(got[:, valid], want.numpy()[:, valid])
