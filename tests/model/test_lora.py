"""LoRA: zero-initialised B starts exactly at the base model; merging keeps the function."""

import numpy as np
import pytest
from flax import nnx

from tests.model import tiny
from trace_jax.model.lora import LoRADense, apply_lora, merge_lora


def test_lora_starts_at_base_and_merges():
  model = tiny.model()
  batch = tiny.batch()
  base = np.asarray(model(**batch).logits)
  apply_lora(model, rank=4, alpha=8.0, targets=("q", "v", "o", "down"), rngs=nnx.Rngs(3))
  assert isinstance(model.decoder.layers.q, LoRADense)
  np.testing.assert_array_equal(np.asarray(model(**batch).logits), base)
  for name in ("q", "down"):
    layer = getattr(model.decoder.layers, name)
    layer.lora_b.set_value(layer.lora_b[...] + 0.05)
  adapted = np.asarray(model(**batch).logits)
  assert np.abs(adapted - base).max() > 1e-3
  merge_lora(model)
  assert not isinstance(model.decoder.layers.q, LoRADense)
  assert not list(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
  np.testing.assert_allclose(np.asarray(model(**batch).logits), adapted, atol=1e-5)


def test_unknown_target():
  with pytest.raises(ValueError, match="unknown LoRA targets"):
    apply_lora(tiny.model(), rank=2, alpha=2.0, targets=("qkv",), rngs=nnx.Rngs(0))
