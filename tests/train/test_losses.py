"""Each loss against a plain numpy reference, in value and in gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from trace_jax.train import losses


def np_infonce(q, c, scale, neg=None, symmetric=False):
  """Value and analytic gradients (dq, dc, dneg, dscale) of InfoNCE, float64 numpy."""
  def one(x, cands, b):
    s = x @ cands.T
    z = scale * s
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    idx = np.arange(b)
    loss = np.mean(lse - z[idx, idx])
    onehot = np.zeros_like(s)
    onehot[idx, idx] = 1
    ds = scale * (p - onehot) / b
    dscale = np.mean((p * s).sum(1) - s[idx, idx])
    return loss, ds @ cands, ds.T @ x, dscale
  b = q.shape[0]
  cands = c if neg is None else np.concatenate([c, neg])
  loss, dq, dcands, dscale = one(q, cands, b)
  dc, dneg = dcands[:b], dcands[b:]
  if symmetric:
    loss2, dc2, dq2, dscale2 = one(c, q, b)
    loss, dq, dc, dneg, dscale = (0.5 * (loss + loss2), 0.5 * (dq + dq2), 0.5 * (dc + dc2),
                                  0.5 * dneg, 0.5 * (dscale + dscale2))
  return loss, dq, dc, (dneg if neg is not None else None), dscale


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("impl", ["global", "shard_map", "chunked"])
@pytest.mark.parametrize("symmetric,hard_neg", [(False, False), (True, False), (False, True),
                                                (True, True)])
def test_infonce_matches_numpy(mesh, impl, symmetric, hard_neg):
  rng = np.random.default_rng(0)
  b, d, scale = 16, 8, 7.0
  q, c, n = (unit(rng.standard_normal((b, d))) for _ in range(3))
  c[:4] = unit(q[:4] + 0.3 * c[:4])  # Some easy positives so top-1 is not trivial.
  neg = n if hard_neg else None
  want = np_infonce(q, c, scale, neg, symmetric)

  fns = {
    "global": lambda *a, **k: losses.infonce_global(*a, **k),
    "shard_map": lambda *a, **k: losses.infonce_shard_map(*a, mesh=mesh, **k),
    "chunked": lambda *a, **k: losses.infonce_chunked(*a, mesh=mesh, chunk=5, **k),
  }

  def loss(q, c, n, s):
    return fns[impl](q, c, s, neg_bd=n if hard_neg else None, symmetric=symmetric)[0]

  sh = NamedSharding(mesh, P(("data", "fsdp"), None))
  args = [jax.device_put(jnp.asarray(x, jnp.float32), sh) for x in (q, c, n)]
  with jax.set_mesh(mesh):
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(
      *args, jnp.float32(scale))
  np.testing.assert_allclose(value, want[0], rtol=1e-5)
  np.testing.assert_allclose(grads[0], want[1], atol=1e-5)
  np.testing.assert_allclose(grads[1], want[2], atol=1e-5)
  if hard_neg:
    np.testing.assert_allclose(grads[2], want[3], atol=1e-5)
  np.testing.assert_allclose(grads[3], want[4], rtol=1e-4, atol=1e-6)


def test_infonce_stats_agree(mesh):
  rng = np.random.default_rng(1)
  q, c = unit(rng.standard_normal((16, 8))), unit(rng.standard_normal((16, 8)))
  c[:6] = unit(q[:6] + 0.1 * c[:6])
  sims = q @ c.T
  with jax.set_mesh(mesh):
    outs = [losses.infonce_global(q, c, 10.0)[1],
            losses.infonce_shard_map(jnp.asarray(q), jnp.asarray(c), 10.0, mesh=mesh)[1],
            losses.infonce_chunked(jnp.asarray(q), jnp.asarray(c), 10.0, mesh=mesh, chunk=3)[1]]
  for stats in outs:
    np.testing.assert_allclose(stats.top1, np.mean(sims.argmax(1) == np.arange(16)))
    np.testing.assert_allclose(stats.pos_logit, np.mean(np.diag(sims)), rtol=1e-5)
    np.testing.assert_allclose(stats.neg_logit, (sims.sum() - np.trace(sims)) / (16 * 15),
                               rtol=1e-4, atol=1e-6)


def test_lm_loss_matches_numpy():
  rng = np.random.default_rng(0)
  n, d, v = 12, 8, 37
  h, w = rng.standard_normal((n, d)), rng.standard_normal((d, v))
  t, wt = rng.integers(0, v, n), (rng.random(n) > 0.3).astype(np.float64)
  logits = h @ w
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  ce = -np.log(p[np.arange(n), t])
  onehot = np.eye(v)[t]
  dlogits = (p - onehot) * wt[:, None]
  hj, wj = jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32)

  def f(h, w):
    return losses.lm_loss(h, w, jnp.asarray(t), jnp.asarray(wt), chunk=10)  # 37 = 3 x 10 + 7.

  total, count = f(hj, wj)
  dh, dw = jax.grad(lambda h, w: f(h, w)[0], argnums=(0, 1))(hj, wj)
  np.testing.assert_allclose(total, np.sum(ce * wt), rtol=1e-5)
  np.testing.assert_allclose(count, wt.sum())
  np.testing.assert_allclose(dh, dlogits @ w.T, atol=1e-4)
  np.testing.assert_allclose(dw, h.T @ dlogits, atol=1e-4)
