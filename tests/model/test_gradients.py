"""trace_jax's parameter gradients equal transformers' autograd on tiny random checkpoints.

The decoder's dense layers and attention have hand-written backward passes (`layers._contract`,
`layers._attend`: the same gradients as autodiff, with their dots ordered for XLA:CPU); this is
their check against the reference implementation, through the whole model with images, grouped-
query attention and padding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from tests.model import reference
from tests.model.reference import Case
from trace_jax.model.hf_io import load_hf, tensor_specs, to_hf
from trace_jax.model.layers import DOTS_POLICY, attention, contract

CASES = [
  Case("v25_kv2_image_right", "qwen2_5_vl", kv_heads=2, tie=False, grids=((1, 6, 12),)),
  Case("v2_kv1_tied_two_images_left", "qwen2_vl", kv_heads=1, tie=True,
       grids=((1, 4, 4), (1, 6, 4)), images_per_row=2, padding="left"),
]
TORCH_LAYOUT = {"text": "model.language_model", "vision": "model.visual"}  # named_parameters()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gradients_match_transformers(case, tmp_path):
  ref = reference.hf_model(case)
  ref.save_pretrained(tmp_path)
  batch = reference.inputs(case)
  valid = batch["attention_mask"].astype(np.float32)
  rng = np.random.default_rng(1)
  weights = rng.standard_normal((*valid.shape, ref.config.text_config.vocab_size))
  weights = (weights * valid[..., None]).astype(np.float32)  # Padding positions carry no loss.

  kw = {k: torch.tensor(v) for k, v in batch.items()}
  kw["mm_token_type_ids"] = (kw["input_ids"] == reference.IMAGE).long()
  (ref(**kw).logits * torch.tensor(weights)).sum().backward()
  want = {name: p.grad.numpy() for name, p in ref.named_parameters()}

  model, cfg = load_hf(str(tmp_path), dtype="float32")
  grads = nnx.grad(lambda m: jnp.sum(m(**batch).logits * weights))(model)
  flat = dict(nnx.to_flat_state(grads))
  checked = 0
  for spec in tensor_specs(cfg, TORCH_LAYOUT):
    if spec.hf_name not in want:  # Tied lm_head.
      continue
    got = np.asarray(flat[spec.path].get_value())
    got = to_hf(spec, got[spec.layer] if spec.layer is not None else got)
    scale = np.abs(want[spec.hf_name]).max()
    np.testing.assert_allclose(got, want[spec.hf_name], atol=1e-5 * scale + 1e-7, rtol=1e-4,
                               err_msg=spec.hf_name)
    checked += 1
  assert checked == len(want)


def _naive_attention(q_btnh, k_bskh, v_bskh, mask_bts):
  b, t, n, h = q_btnh.shape
  kv_heads = k_bskh.shape[2]
  q = q_btnh.reshape(b, t, kv_heads, n // kv_heads, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k_bskh) / np.sqrt(h)
  logits = jnp.where(mask_bts[:, None, None], logits, jnp.finfo(jnp.float32).min)
  out = jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(logits, axis=-1), v_bskh)
  return out.reshape(b, t, n, h)


@pytest.mark.parametrize("kv_layout", ["bskh", "bksh"])
def test_attention_gradients_equal_autodiff(kv_layout):
  """Against autodiff of the plain einsum formulation, with a cotangent on every row, including
  a query row that sees no key (its output is an average of values)."""
  rng = np.random.default_rng(0)
  b, t, s, n, kv_heads, h = 2, 5, 7, 6, 2, 8
  q, k, v, d_out = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in
                    ((b, t, n, h), (b, s, kv_heads, h), (b, s, kv_heads, h), (b, t, n, h)))
  mask = jnp.asarray(rng.random((b, t, s)) < 0.6).at[1, 2].set(False)
  swap = (lambda x: jnp.swapaxes(x, 1, 2)) if kv_layout == "bksh" else (lambda x: x)
  got_out, vjp = jax.vjp(lambda *a: attention(a[0], swap(a[1]), swap(a[2]), mask, kv_layout),
                         q, k, v)
  want_out, want_vjp = jax.vjp(lambda *a: _naive_attention(*a, mask), q, k, v)
  np.testing.assert_allclose(got_out, want_out, atol=1e-5, rtol=1e-5)
  for got, want, name in zip(vjp(d_out), want_vjp(d_out), "qkv"):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_gradients(remat, tmp_path):
  """The custom backward passes under `jax.checkpoint` (each policy) give the same gradients."""
  case = CASES[0]
  reference.hf_model(case).save_pretrained(tmp_path)
  batch = reference.inputs(case)
  weights = np.random.default_rng(1).standard_normal((*batch["input_ids"].shape, 300))

  def grads(**kw):
    model, _ = load_hf(str(tmp_path), dtype="float32", **kw)
    g = nnx.grad(lambda m: jnp.sum(m(**batch).logits * weights))(model)
    return dict(nnx.to_flat_state(g))

  want, got = grads(), grads(remat=remat)
  assert got.keys() == want.keys()
  for path in want:  # Recomputed activations round differently: float32 noise, scaled.
    w = np.asarray(want[path].get_value())
    np.testing.assert_allclose(got[path].get_value(), w, atol=1e-5 * np.abs(w).max() + 1e-7,
                               rtol=1e-4, err_msg=str(path))


def test_dots_policy_keeps_dense_outputs(capsys):
  """`remat="dots"` saves the dense layers' products although they sit inside a custom VJP."""
  x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
  print_saved_residuals(jax.checkpoint(lambda x, w: jnp.sum(jnp.tanh(contract(x, w, 1))),
                                       policy=DOTS_POLICY), x, w)
  assert "f32[4,16] named 'dense'" in capsys.readouterr().out
