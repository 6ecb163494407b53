"""TRACE's two losses: next-token cross-entropy on the query target and cross-device InfoNCE.

`lm_loss` never builds [batch, tokens, vocab] logits: it takes hidden states at target positions
only and streams the vocabulary in chunks with an online log-sum-exp (TRACE.md, "Training").
InfoNCE has three implementations that agree in value and gradient: `infonce_global` (one global
matrix under jit; GSPMD inserts the gathers), `infonce_shard_map` (explicit `all_gather` of the
candidates) and `infonce_chunked` (the same, streaming candidate chunks so per-device memory grows
with local batch x chunk). Embeddings arrive L2-normalised; nothing here runs the model.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # Mesh axes the batch is split over (see sharding.DEFAULT_RULES).


def lm_loss(h_nd: jax.Array, w_dv: jax.Array, targets_n: jax.Array, weights_n: jax.Array,
            chunk: int) -> tuple[jax.Array, jax.Array]:
  """Summed token cross-entropy and the summed weights.

  Args:
    h_nd: hidden states at the positions that predict a target, [N, D].
    w_dv: unembedding [D, V].
    targets_n: target token ids [N]; weights_n: 1 for real targets, 0 for padding [N].
    chunk: vocabulary chunk; the [N, chunk] logits block is recomputed in the backward pass.
  Returns:
    (sum_n weights_n * CE_n, sum_n weights_n), both float32 scalars.
  """
  d, v = w_dv.shape
  n_chunks = -(-v // chunk)
  w = jnp.pad(w_dv, ((0, 0), (0, n_chunks * chunk - v)))
  w_kdc = w.reshape(d, n_chunks, chunk).transpose(1, 0, 2)
  starts = jnp.arange(n_chunks) * chunk
  n = h_nd.shape[0]

  @jax.checkpoint
  def body(carry, xs):
    m, s, tgt = carry
    w_dc, start = xs
    logits = jnp.dot(h_nd.astype(w_dc.dtype), w_dc, preferred_element_type=jnp.float32)
    ids = start + jnp.arange(chunk)
    logits = jnp.where(ids[None] < v, logits, -jnp.inf)
    m_new = jnp.maximum(m, logits.max(-1))
    s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(-1)
    tgt = tgt + jnp.sum(jnp.where(ids[None] == targets_n[:, None], logits, 0.0), -1)
    return (m_new, s, tgt), None

  init = (jnp.full((n,), -jnp.inf), jnp.zeros((n,)), jnp.zeros((n,)))
  (m, s, tgt), _ = jax.lax.scan(body, init, (w_kdc, starts))
  ce = m + jnp.log(s) - tgt
  weights = weights_n.astype(jnp.float32)
  return jnp.sum(ce * weights), jnp.sum(weights)


@dataclasses.dataclass(frozen=True)
class ContrastiveStats:
  """What the loss reports besides its value (all float32 scalars)."""

  top1: jax.Array  # Fraction of queries whose positive scores highest.
  pos_logit: jax.Array  # Mean similarity (before the temperature) of the positive pairs.
  neg_logit: jax.Array  # Mean similarity of the negatives.


jax.tree_util.register_dataclass(ContrastiveStats, data_fields=["top1", "pos_logit", "neg_logit"],
                                 meta_fields=[])


def _rows_loss(q_bd, c_gd, labels_b, scale):
  """Sum over rows of -log softmax(q . c / tau)[label], plus stats sums, over all of c at once."""
  sims = jnp.dot(q_bd, c_gd.T, preferred_element_type=jnp.float32)
  lse = jax.nn.logsumexp(sims * scale, axis=-1)
  pos = jnp.take_along_axis(sims, labels_b[:, None], axis=-1)[:, 0]
  top1 = jnp.sum(jnp.argmax(sims, axis=-1) == labels_b)
  return jnp.sum(lse - pos * scale), top1, jnp.sum(pos), jnp.sum(sims) - jnp.sum(pos)


def _rows_loss_chunked(q_bd, c_gd, labels_b, scale, chunk):
  """`_rows_loss` streaming `chunk` candidates at a time (memory: rows x chunk)."""
  g = c_gd.shape[0]
  n_chunks = -(-g // chunk)
  c = jnp.pad(c_gd, ((0, n_chunks * chunk - g), (0, 0))).reshape(n_chunks, chunk, -1)
  b = q_bd.shape[0]

  @jax.checkpoint
  def body(carry, xs):
    m, s, pos, best, best_idx, total = carry
    c_kd, start = xs
    sims = jnp.dot(q_bd, c_kd.T, preferred_element_type=jnp.float32)
    ids = start + jnp.arange(chunk)
    valid = ids[None] < g
    logits = jnp.where(valid, sims * scale, -jnp.inf)
    m_new = jnp.maximum(m, logits.max(-1))
    s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(-1)
    pos = pos + jnp.sum(jnp.where(ids[None] == labels_b[:, None], sims, 0.0), -1)
    chunk_best = jnp.where(valid, sims, -jnp.inf).max(-1)
    chunk_idx = start + jnp.argmax(jnp.where(valid, sims, -jnp.inf), -1)
    better = chunk_best > best
    total = total + jnp.sum(jnp.where(valid, sims, 0.0))
    return (m_new, s, pos, jnp.where(better, chunk_best, best),
            jnp.where(better, chunk_idx, best_idx), total), None

  init = (jnp.full((b,), -jnp.inf), jnp.zeros((b,)), jnp.zeros((b,)), jnp.full((b,), -jnp.inf),
          jnp.zeros((b,), jnp.int32), jnp.zeros(()))
  (m, s, pos, _, best_idx, total), _ = jax.lax.scan(
    body, init, (c, jnp.arange(n_chunks) * chunk))
  lse = m + jnp.log(s)
  return (jnp.sum(lse - pos * scale), jnp.sum(best_idx == labels_b), jnp.sum(pos),
          total - jnp.sum(pos))


def _finish(loss_sum, top1, pos, neg, b, g, symmetric_sum=None):
  loss = loss_sum / b
  if symmetric_sum is not None:
    loss = 0.5 * (loss + symmetric_sum / b)
  return loss, ContrastiveStats(top1 / b, pos / b, neg / (b * (g - 1)))


def infonce_global(q_bd, c_bd, scale, *, neg_bd=None, symmetric=False):
  """InfoNCE over the global batch as one matrix. `scale` = 1 / temperature.

  Query i's positive is candidate i; every other candidate of the batch (and every hard negative,
  if given) is a negative. With `symmetric`, the candidate->query term is averaged in.
  Returns (loss, ContrastiveStats).
  """
  b = q_bd.shape[0]
  cands = c_bd if neg_bd is None else jnp.concatenate([c_bd, neg_bd])
  labels = jnp.arange(b)
  out = _rows_loss(q_bd, cands, labels, scale)
  sym = _rows_loss(c_bd, q_bd, labels, scale)[0] if symmetric else None
  return _finish(*out, b, cands.shape[0], sym)


def infonce_shard_map(q_bd, c_bd, scale, *, mesh, neg_bd=None, symmetric=False,
                      chunk: int | None = None):
  """InfoNCE with an explicit `all_gather` of the candidates over the batch mesh axes.

  With `chunk`, each device streams the gathered candidates `chunk` rows at a time, so its
  temporary memory is local batch x chunk (plus the gathered [global batch, D] embeddings).
  """
  has_neg = neg_bd is not None
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)

  def local(q, c, scale, *neg):
    b_local = q.shape[0]
    offset = jax.lax.axis_index(axes) * b_local
    c_all = jax.lax.all_gather(c, axes, tiled=True)
    cands = c_all
    if neg:
      cands = jnp.concatenate([c_all, jax.lax.all_gather(neg[0], axes, tiled=True)])
    labels = offset + jnp.arange(b_local)
    rows = (functools.partial(_rows_loss_chunked, chunk=chunk) if chunk else _rows_loss)
    out = rows(q, cands, labels, scale)
    sums = [jax.lax.psum(x, axes) for x in out]
    if symmetric:
      q_all = jax.lax.all_gather(q, axes, tiled=True)
      sums.append(jax.lax.psum(rows(c, q_all, labels, scale)[0], axes))
    return tuple(sums)

  spec = P(axes, None)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P()) + ((spec,) if has_neg else ()),
                     out_specs=P(), check_vma=False)
  sums = fn(q_bd, c_bd, scale, *((neg_bd,) if has_neg else ()))
  b = q_bd.shape[0]
  g = b * (2 if has_neg else 1)
  return _finish(*sums[:4], b, g, sums[4] if symmetric else None)


def infonce_chunked(q_bd, c_bd, scale, *, mesh, chunk: int, neg_bd=None, symmetric=False):
  """`infonce_shard_map` streaming candidates in chunks (memory linear in the global batch)."""
  return infonce_shard_map(q_bd, c_bd, scale, mesh=mesh, neg_bd=neg_bd, symmetric=symmetric,
                           chunk=chunk)
