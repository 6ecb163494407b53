"""Prefill + one-token decode steps with the KV cache give the logits of a full forward."""

import numpy as np
import pytest
from flax import nnx

from tests.model import tiny


@pytest.mark.parametrize("padding", ["left", "right"])
def test_decode_equals_full_forward(padding):
  model = tiny.model()
  batch = tiny.batch(padding=padding)
  steps = 4
  out = model.prefill(**batch, max_len=batch["input_ids"].shape[1] + steps)
  full = model(**batch)
  valid = batch["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(out.logits)[valid], np.asarray(full.logits)[valid],
                             atol=1e-5)
  decode = nnx.jit(lambda m, tok, cache: m.decode(tok, cache))
  last = valid.shape[1] - 1 - np.argmax(valid[:, ::-1], axis=1)  # Last real token per row.
  token = np.asarray(out.logits)[np.arange(2), last].argmax(-1)[:, None].astype(np.int32)
  ids, mask, cache = batch["input_ids"], batch["attention_mask"], out.cache
  for _ in range(steps):
    step = decode(model, token, cache)
    cache = step.cache
    ids = np.concatenate([ids, token], axis=1)
    mask = np.concatenate([mask, np.ones_like(token)], axis=1)
    ref = model(ids, mask, batch["pixel_values"], batch["image_grid_thw"])
    np.testing.assert_allclose(np.asarray(step.logits)[:, 0], np.asarray(ref.logits)[:, -1],
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(step.hidden_states)[:, 0],
                               np.asarray(ref.hidden_states)[:, -1], atol=1e-5)
    token = np.asarray(step.logits)[:, 0].argmax(-1)[:, None].astype(np.int32)
  assert int(cache.index) == batch["input_ids"].shape[1] + steps


def test_text_only_decode():
  model = tiny.model(tiny.config(num_kv_heads=1))
  ids = np.array([[3, 4, 5, 6], [0, 7, 8, 9]], np.int32)
  mask = np.array([[1, 1, 1, 1], [0, 1, 1, 1]], np.int32)
  out = model.prefill(ids, mask, max_len=6)
  nxt = np.array([[10], [11]], np.int32)
  step = model.decode(nxt, out.cache)
  ref = model(np.concatenate([ids, nxt], 1), np.concatenate([mask, np.ones_like(nxt)], 1))
  np.testing.assert_allclose(np.asarray(step.logits)[:, 0], np.asarray(ref.logits)[:, -1],
                             atol=1e-5)


def test_per_row_index_decode_equals_full_forward():
  """A right-padded prefill, then decoding with one write index per row (each row continues
  right after its own prompt, over its padding slots), equals full forwards of each row alone."""
  model = tiny.model()
  batch = tiny.batch(padding="right")
  lengths = batch["attention_mask"].sum(1)
  steps = 3
  out = model.prefill(**batch, max_len=batch["input_ids"].shape[1] + steps)
  cache = out.cache.__class__(out.cache.k_lbksh, out.cache.v_lbksh, out.cache.valid_bs,
                              np.asarray(lengths, np.int32), out.cache.next_position_b)
  decode = nnx.jit(lambda m, tok, cache: m.decode(tok, cache))
  token = np.asarray(out.logits)[np.arange(2), lengths - 1].argmax(-1)[:, None].astype(np.int32)
  seqs = [list(batch["input_ids"][b, :lengths[b]]) for b in range(2)]
  for _ in range(steps):
    step = decode(model, token, cache)
    cache = step.cache
    for b in range(2):
      seqs[b].append(int(token[b, 0]))
      ids = np.asarray([seqs[b]], np.int32)
      pixels = batch["pixel_values"][b * 32:(b + 1) * 32]  # One 4x8 image per row.
      ref = model(ids, None, pixels, batch["image_grid_thw"][b:b + 1])
      np.testing.assert_allclose(np.asarray(step.logits)[b, 0], np.asarray(ref.logits)[0, -1],
                                 atol=1e-5)
    token = np.asarray(step.logits)[:, 0].argmax(-1)[:, None].astype(np.int32)
  np.testing.assert_array_equal(np.asarray(cache.index), lengths + steps)
