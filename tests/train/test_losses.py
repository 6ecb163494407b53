"""Each loss against a plain numpy reference, in value and in gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from trace_jax.train import losses


def np_infonce(q, c, scale, neg=None, symmetric=False, keys=None, neg_keys=None):
  """Value and analytic gradients (dq, dc, dneg, dscale) of InfoNCE, float64 numpy. With `keys`
  (the candidates' ids), a column holding the same candidate as the row's positive (and not the
  positive itself) is no negative: it leaves the softmax."""
  def one(x, cands, b, row_keys, col_keys):
    s = x @ cands.T
    z = scale * s
    idx = np.arange(b)
    if row_keys is not None:
      dup = (col_keys[None] == row_keys[:, None]) & (np.arange(len(cands))[None] != idx[:, None])
      z = np.where(dup, -np.inf, z)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    loss = np.mean(lse - z[idx, idx])
    onehot = np.zeros_like(s)
    onehot[idx, idx] = 1
    ds = scale * (p - onehot) / b
    dscale = np.mean((p * s).sum(1) - s[idx, idx])
    return loss, ds @ cands, ds.T @ x, dscale
  b = q.shape[0]
  cands = c if neg is None else np.concatenate([c, neg])
  cols = None if keys is None else (keys if neg is None else np.concatenate([keys, neg_keys]))
  loss, dq, dcands, dscale = one(q, cands, b, keys, cols)
  dc, dneg = dcands[:b], dcands[b:]
  if symmetric:
    loss2, dc2, dq2, dscale2 = one(c, q, b, keys, keys)
    loss, dq, dc, dneg, dscale = (0.5 * (loss + loss2), 0.5 * (dq + dq2), 0.5 * (dc + dc2),
                                  0.5 * dneg, 0.5 * (dscale + dscale2))
  return loss, dq, dc, (dneg if neg is not None else None), dscale


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


FNS = {
  "global": lambda *a, mesh, **k: losses.infonce_global(*a, **k),
  "shard_map": lambda *a, mesh, **k: losses.infonce_shard_map(*a, mesh=mesh, **k),
  "chunked": lambda *a, mesh, **k: losses.infonce_chunked(*a, mesh=mesh, chunk=5, **k),
}


def _duplicated_batch(b, d, seed=0):
  """Embeddings where candidates 2, 5, 9 are one candidate (as are 3 and 12), drawn for
  different queries, and hard negative 7 is candidate 0 again: keys name each candidate."""
  rng = np.random.default_rng(seed)
  q, c, n = (unit(rng.standard_normal((b, d))) for _ in range(3))
  c[:4] = unit(q[:4] + 0.3 * c[:4])  # Some easy positives so top-1 is not trivial.
  keys = np.arange(100, 100 + b)
  for group in ((2, 5, 9), (3, 12)):
    c[list(group)] = c[group[0]]
    keys[list(group)] = keys[group[0]]
  neg_keys = np.arange(500, 500 + b)
  n[7], neg_keys[7] = c[0], keys[0]
  return q, c, n, keys.astype(np.int32), neg_keys.astype(np.int32)


@pytest.mark.parametrize("impl", ["global", "shard_map", "chunked"])
@pytest.mark.parametrize("symmetric,hard_neg,keyed", [
  (False, False, False), (True, False, False), (False, True, False), (True, True, False),
  (False, False, True), (True, True, True)])
def test_infonce_matches_numpy(mesh, impl, symmetric, hard_neg, keyed):
  b, d, scale = 16, 8, 7.0
  q, c, n, keys, neg_keys = _duplicated_batch(b, d)
  neg = n if hard_neg else None
  key_kw = dict(cand_keys=keys, neg_keys=neg_keys if hard_neg else None) if keyed else {}
  want = np_infonce(q, c, scale, neg, symmetric,
                    *((keys, neg_keys if hard_neg else None) if keyed else ()))

  def loss(q, c, n, s, *k):
    kw = dict(cand_keys=k[0], neg_keys=k[1] if hard_neg else None) if keyed else {}
    return FNS[impl](q, c, s, mesh=mesh, neg_bd=n if hard_neg else None, symmetric=symmetric,
                     **kw)[0]

  sh = NamedSharding(mesh, P(("data", "fsdp"), None))
  args = [jax.device_put(jnp.asarray(x, jnp.float32), sh) for x in (q, c, n)]
  key_args = [jax.device_put(jnp.asarray(x), NamedSharding(mesh, P(("data", "fsdp"))))
              for x in (keys, neg_keys)] if key_kw else []
  with jax.set_mesh(mesh):
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(
      *args, jnp.float32(scale), *key_args)
  np.testing.assert_allclose(value, want[0], rtol=1e-5)
  np.testing.assert_allclose(grads[0], want[1], atol=1e-5)
  np.testing.assert_allclose(grads[1], want[2], atol=1e-5)
  if hard_neg:
    np.testing.assert_allclose(grads[2], want[3], atol=1e-5)
  np.testing.assert_allclose(grads[3], want[4], rtol=1e-4, atol=1e-6)


def test_masking_duplicates_changes_the_loss():
  """The duplicated batch is a real test of the mask: without keys the loss differs."""
  q, c, n, keys, neg_keys = _duplicated_batch(16, 8)
  masked = np_infonce(q, c, 7.0, n, True, keys, neg_keys)[0]
  assert abs(masked - np_infonce(q, c, 7.0, n, True)[0]) > 1e-2


@pytest.mark.parametrize("impl", ["global", "shard_map", "chunked"])
def test_masked_stats_leave_duplicates_out(mesh, impl):
  q, c, _, keys, _ = _duplicated_batch(16, 8, seed=3)
  c[5] = unit(c[5] + 1e-3)  # A near-copy of positive 2 (same key) may not win query 5's top-1.
  sims = q @ c.T
  dup = (keys[None] == keys[:, None]) & ~np.eye(16, dtype=bool)
  with jax.set_mesh(mesh):
    stats = FNS[impl](jnp.asarray(q), jnp.asarray(c), 10.0, mesh=mesh, cand_keys=keys)[1]
  masked = np.where(dup, -np.inf, sims)
  np.testing.assert_allclose(stats.top1, np.mean(masked.argmax(1) == np.arange(16)))
  negs = ~dup & ~np.eye(16, dtype=bool)
  np.testing.assert_allclose(stats.neg_logit, sims[negs].mean(), rtol=1e-4, atol=1e-6)


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
