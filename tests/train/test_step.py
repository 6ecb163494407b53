"""The TRACE train step: sharded equals one device, GradCache equals one shot, frozen stays."""

import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from tests.model import tiny
from tests.train import batches
from trace_jax import sharding
from trace_jax.model import QwenVL
from trace_jax.model.lora import apply_lora
from trace_jax.train import state as state_lib
from trace_jax.train.step import StepConfig, make_train_step

# No warmup, so every step updates. Adam's first updates are about lr * sign(g): with the default
# eps a near-zero gradient's float noise would flip whole updates between meshes; eps=1e-3 keeps
# the update linear in such gradients so that parameters can be compared tightly.
OPTIM = ConfigDict(dict(lr=1e-2, warmup_steps=0, final_lr_fraction=0.1, weight_decay=0.01,
                        b1=0.9, b2=0.99, eps=1e-3, grad_clip=1.0))


def build(mesh, *, lora_rank=4, steps=2, keys=True, **step_kw):
  # Two steps: the last metrics and the parameters depend on real updates.
  """A LoRA tiny model born sharded on `mesh`, its state and jitted step, and a batch."""
  cfg = tiny.config()

  def make():
    model = tiny.perturb(QwenVL(cfg, rngs=nnx.Rngs(0)))
    if lora_rank:
      apply_lora(model, rank=lora_rank, alpha=2.0 * lora_rank, rngs=nnx.Rngs(1))
      for name in ("q", "v", "down"):  # Non-zero B so LoRA gradients flow everywhere.
        layer = getattr(model.decoder.layers, name)
        layer.lora_b.set_value(layer.lora_b[...] + 0.01)
    return model

  with jax.set_mesh(mesh):
    model = sharding.create_sharded(make, mesh)
    tx, schedule = state_lib.make_optimizer(OPTIM, total_steps=10)
    step_cfg = StepConfig(emb_token_id=batches.EMB, temperature=0.1, vocab_chunk=40,
                          contrastive_chunk=3, max_target_tokens=8, **step_kw)
    graphdef, st = state_lib.init_state(model, tx, lora_rank=lora_rank, mesh=mesh,
                                        temperature=0.1,
                                        learn_temperature=step_cfg.learn_temperature)
    batch = batches.make(cfg, hard_negatives=step_kw.get("symmetric", False), keys=keys)
    step = make_train_step(graphdef, step_cfg, tx, schedule, mesh, state_lib.shardings_of(st))
    metrics = None
    for _ in range(steps):
      st, metrics = step(st, batch)
  return st, jax.device_get(metrics)


def params_of(st):
  return [np.asarray(x) for x in jax.tree.leaves(st.params)]


@pytest.fixture(scope="module")
def reference():
  """Two steps on a single device (1x1x1 mesh)."""
  return build(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1), (4, 1, 2)])
def test_sharded_equals_single_device(reference, mesh_factory, shape):
  st, metrics = build(mesh_factory(*shape))
  ref_st, ref_metrics = reference
  for key in ("loss/total", "loss/lm", "loss/contrastive", "optim/grad_norm"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=2e-5, err_msg=key)
  for a, b in zip(params_of(st), params_of(ref_st)):
    np.testing.assert_allclose(a, b, atol=2e-6)


def test_metrics_and_frozen(mesh, reference):
  st, metrics = build(mesh)
  assert metrics["lm/target_tokens"] == 8 + (5 + 4 + 6 + 5)  # <|emb|> per row + reasoning.
  assert metrics["lm/dropped_targets"] == 0
  assert metrics["route/reason_frac"] == 0.5
  assert metrics["loss/total"] == pytest.approx(metrics["loss/lm"] + metrics["loss/contrastive"],
                                                rel=1e-6)
  # Only LoRA adapters and the merger train; the rest is frozen and carries no optimizer state.
  trained = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(st.params["model"])}
  assert all("lora_" in p or "merger" in p for p in trained) and trained
  n_opt = sum(x.size for x in jax.tree.leaves(st.opt_state))
  n_trained = sum(x.size for x in jax.tree.leaves(st.params))
  assert n_opt < 2 * n_trained + 10  # Adam's two moments of the trainable params, and counters.


def test_frozen_unchanged_and_loss_falls(mesh):
  st0, _ = build(mesh, steps=0)
  st1, m1 = build(mesh, steps=1)
  st6, m6 = build(mesh, steps=6)
  assert m6["loss/total"] < m1["loss/total"]
  for a, b in zip(jax.tree.leaves(st0.frozen), jax.tree.leaves(st6.frozen)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  changed = [not np.array_equal(a, b) for a, b in zip(params_of(st0), params_of(st6))]
  assert all(changed)  # Every trainable leaf (LoRA A and B, merger) moved.


def test_step_masks_in_batch_duplicates():
  """Rows 1 and 6 share a candidate: with its ids in the batch, neither is the other's negative,
  so the loss differs from the unmasked one (the losses' own tests check the values)."""
  one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  _, unmasked = build(one, steps=1, keys=False)
  _, masked = build(one, steps=1)
  assert abs(masked["loss/contrastive"] - unmasked["loss/contrastive"]) > 1e-3


@pytest.mark.parametrize("impl", ["global", "shard_map"])
def test_contrastive_impls_agree_in_the_step(mesh, impl):
  st, m = build(mesh, contrastive_impl=impl)
  ref_st, ref_m = build(mesh)  # chunked
  np.testing.assert_allclose(m["loss/total"], ref_m["loss/total"], rtol=1e-5)
  for a, b in zip(params_of(st), params_of(ref_st)):
    np.testing.assert_allclose(a, b, atol=2e-6)


@pytest.mark.parametrize("kw", [{}, {"symmetric": True, "learn_temperature": True}])
def test_grad_cache_equals_one_shot(mesh, kw):
  st, m = build(mesh, micro_batches=2, **kw)
  ref_st, ref_m = build(mesh, micro_batches=1, **kw)
  for key in ("loss/total", "loss/lm", "loss/contrastive", "optim/grad_norm"):
    np.testing.assert_allclose(m[key], ref_m[key], rtol=1e-5, err_msg=key)
  for a, b in zip(params_of(st), params_of(ref_st)):
    np.testing.assert_allclose(a, b, atol=2e-6)
