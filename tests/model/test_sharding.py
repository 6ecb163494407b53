"""Parameters are born sharded by the logical-axis rules; sharded forward equals one device."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tests.model import tiny
from trace_jax import sharding
from trace_jax.model import QwenVL, prepare_positions


def test_logical_to_spec_rules(mesh):
  assert sharding.logical_to_spec(("embed", "mlp"), (64, 96), mesh) == P("fsdp", "tensor")
  # kv_heads=1 cannot split over tensor=2: replicated rather than an error.
  spec = sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 1, 16), mesh)
  assert spec == P("fsdp", None, None)
  # A mesh axis is used once per array.
  spec = sharding.logical_to_spec(("act_batch", "embed"), (4, 64), mesh)
  assert spec == P(("data", "fsdp"), None)
  with pytest.raises(KeyError, match="no_such_axis"):
    sharding.logical_to_spec(("no_such_axis",), (4,), mesh)
  with sharding.use_rules([("embed", "tensor"), ("mlp", None)]):
    assert sharding.logical_to_spec(("embed", "mlp"), (64, 96), mesh) == P("tensor", None)


def test_make_mesh_fills_and_checks():
  m = sharding.make_mesh(2, -1, 2)
  assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="needs"):
    sharding.make_mesh(2, 2, 4)


def _forward(model, batch, mesh=None):
  extra = prepare_positions(model.cfg, batch["input_ids"], batch["attention_mask"],
                            batch["image_grid_thw"])

  @nnx.jit
  def f(model, ids, mask, pixels, positions, layout):
    out = model(ids, mask, pixels, position_ids=positions, vision_layout=layout)
    return out.logits, out.hidden_states

  args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
          extra["position_ids"], extra["vision_layout"])
  if mesh is None:
    return f(model, *args)
  with jax.set_mesh(mesh):
    ids = sharding.put(batch["input_ids"], mesh, ("act_batch", "act_len"))
    return f(model, ids, *args[1:])


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2), (1, 8, 1)])
def test_sharded_equals_single_device(mesh_factory, shape):
  mesh = mesh_factory(*shape)
  cfg = tiny.config()
  make = lambda: QwenVL(cfg, rngs=nnx.Rngs(0))  # noqa: E731
  sharded = sharding.create_sharded(make, mesh)
  single = make()
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(sharded, nnx.Param)),
                               nnx.to_flat_state(nnx.state(single, nnx.Param))):
    x = a.get_value()
    want = sharding.logical_to_spec(sharding.variable_axes(a), x.shape, mesh)
    assert x.sharding.spec == want, path
    # Same keys and draws; jit may round the normal sampler's last bit differently.
    np.testing.assert_allclose(np.asarray(x), np.asarray(b.get_value()), rtol=1e-6, atol=1e-9,
                               err_msg=str(path))
  kernel = sharded.decoder.layers.gate.kernel[...]
  assert not kernel.sharding.is_fully_replicated, "gate kernel is not sharded"

  batch = tiny.batch(padding="left")
  got = _forward(tiny.perturb(sharded), batch, mesh)
  want = _forward(tiny.perturb(single), batch)
  valid = batch["attention_mask"].astype(bool)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g)[valid], np.asarray(w)[valid], atol=1e-5)


def test_replication_check(mesh):
  model = sharding.create_sharded(lambda: QwenVL(tiny.config(), rngs=nnx.Rngs(0)), mesh)
  rows = sharding.param_table(model)
  assert any(not replicated for *_, replicated in rows)
  assert any(replicated for *_, replicated in rows)  # The norm scales.
  with pytest.raises(ValueError, match="replicated"):
    sharding.log_param_table(model, max_replicated_fraction=0.0)
