"""TRACE's two losses: next-token cross-entropy on the query target and cross-device InfoNCE.

`lm_loss` never builds [batch, tokens, vocab] logits: it takes hidden states at target positions
only and streams the vocabulary in chunks with an online log-sum-exp (TRACE.md, "Training").
InfoNCE has three implementations that agree in value and gradient: `infonce_global` (one global
matrix under jit; GSPMD inserts the gathers), `infonce_shard_map` (explicit `all_gather` of the
candidates) and `infonce_chunked` (the same, streaming candidate chunks so per-device memory grows
with local batch x chunk). All three mask in-batch duplicates: a negative with the same candidate
key as the row's positive (the same candidate drawn for two queries of a batch) is left out of
the softmax. Embeddings arrive L2-normalised; nothing here runs the model.
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
  neg_logit: jax.Array  # Mean similarity of the negatives (masked duplicates left out).


jax.tree_util.register_dataclass(ContrastiveStats, data_fields=["top1", "pos_logit", "neg_logit"],
                                 meta_fields=[])


def _duplicates(row_keys, col_keys, labels_b, col_ids):
  """[b, g] True where column j holds the same candidate as row i's positive but is not that
  positive itself: an identical positive elsewhere in the batch, which is no negative."""
  if row_keys is None:
    return None
  return (col_keys[None] == row_keys[:, None]) & (col_ids[None] != labels_b[:, None])


def _rows_loss(q_bd, c_gd, labels_b, scale, row_keys=None, col_keys=None):
  """Sums over rows of -log softmax(q . c / tau)[label] and of the stats (top-1 hits, positive
  similarity, negative similarity, number of negatives), over all of c at once."""
  sims = jnp.dot(q_bd, c_gd.T, preferred_element_type=jnp.float32)
  g = c_gd.shape[0]
  dup = _duplicates(row_keys, col_keys, labels_b, jnp.arange(g))
  masked = sims if dup is None else jnp.where(dup, -jnp.inf, sims)
  logits = sims * scale if dup is None else jnp.where(dup, -jnp.inf, sims * scale)
  lse = jax.nn.logsumexp(logits, axis=-1)
  pos = jnp.take_along_axis(sims, labels_b[:, None], axis=-1)[:, 0]
  top1 = jnp.sum(jnp.argmax(masked, axis=-1) == labels_b)
  negs = sims if dup is None else jnp.where(dup, 0.0, sims)
  n_dup = 0 if dup is None else jnp.sum(dup)
  return (jnp.sum(lse - pos * scale), top1, jnp.sum(pos), jnp.sum(negs) - jnp.sum(pos),
          q_bd.shape[0] * (g - 1) - n_dup)


def _rows_loss_chunked(q_bd, c_gd, labels_b, scale, chunk, row_keys=None, col_keys=None):
  """`_rows_loss` streaming `chunk` candidates at a time (memory: rows x chunk)."""
  g = c_gd.shape[0]
  n_chunks = -(-g // chunk)
  c = jnp.pad(c_gd, ((0, n_chunks * chunk - g), (0, 0))).reshape(n_chunks, chunk, -1)
  keyed = row_keys is not None
  k = (jnp.pad(col_keys, (0, n_chunks * chunk - g)).reshape(n_chunks, chunk) if keyed
       else jnp.zeros((n_chunks, chunk), jnp.int32))
  b = q_bd.shape[0]

  @jax.checkpoint
  def body(carry, xs):
    m, s, pos, best, best_idx, total, n_dup = carry
    c_kd, k_k, start = xs
    sims = jnp.dot(q_bd, c_kd.T, preferred_element_type=jnp.float32)
    ids = start + jnp.arange(chunk)
    valid = ids[None] < g
    dup = _duplicates(row_keys, k_k, labels_b, ids)
    if dup is not None:
      dup = dup & valid
      n_dup = n_dup + jnp.sum(dup)
    keep = valid if dup is None else valid & ~dup
    logits = jnp.where(keep, sims * scale, -jnp.inf)
    m_new = jnp.maximum(m, logits.max(-1))
    s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(-1)
    pos = pos + jnp.sum(jnp.where(ids[None] == labels_b[:, None], sims, 0.0), -1)
    chunk_best = jnp.where(keep, sims, -jnp.inf).max(-1)
    chunk_idx = start + jnp.argmax(jnp.where(keep, sims, -jnp.inf), -1)
    better = chunk_best > best
    total = total + jnp.sum(jnp.where(keep, sims, 0.0))
    return (m_new, s, pos, jnp.where(better, chunk_best, best),
            jnp.where(better, chunk_idx, best_idx), total, n_dup), None

  init = (jnp.full((b,), -jnp.inf), jnp.zeros((b,)), jnp.zeros((b,)), jnp.full((b,), -jnp.inf),
          jnp.zeros((b,), jnp.int32), jnp.zeros(()), jnp.zeros((), jnp.int32))
  (m, s, pos, _, best_idx, total, n_dup), _ = jax.lax.scan(
    body, init, (c, k, jnp.arange(n_chunks) * chunk))
  lse = m + jnp.log(s)
  return (jnp.sum(lse - pos * scale), jnp.sum(best_idx == labels_b), jnp.sum(pos),
          total - jnp.sum(pos), b * (g - 1) - n_dup)


def _finish(loss_sum, top1, pos, neg, neg_count, b, symmetric_sum=None):
  loss = loss_sum / b
  if symmetric_sum is not None:
    loss = 0.5 * (loss + symmetric_sum / b)
  return loss, ContrastiveStats(top1 / b, pos / b, neg / jnp.maximum(neg_count, 1))


def _all_keys(cand_keys, neg_keys, has_neg):
  """Candidate keys of the columns (positives, then hard negatives), or None without keys."""
  if cand_keys is None:
    return None
  if not has_neg:
    return cand_keys
  if neg_keys is None:
    raise ValueError("cand_keys given without neg_keys for the hard negatives")
  return jnp.concatenate([cand_keys, neg_keys])


def infonce_global(q_bd, c_bd, scale, *, neg_bd=None, symmetric=False, cand_keys=None,
                   neg_keys=None):
  """InfoNCE over the global batch as one matrix. `scale` = 1 / temperature.

  Query i's positive is candidate i; every other candidate of the batch (and every hard negative,
  if given) is a negative, except those with the same key (`cand_keys` [B], `neg_keys` [B]: the
  candidates' ids) as candidate i: the same candidate drawn as the positive of another query of
  the batch is masked out, never pushed away. With `symmetric`, the candidate->query term is
  averaged in (a query whose positive is candidate i's duplicate is masked there too).
  Returns (loss, ContrastiveStats).
  """
  b = q_bd.shape[0]
  cands = c_bd if neg_bd is None else jnp.concatenate([c_bd, neg_bd])
  labels = jnp.arange(b)
  cols = _all_keys(cand_keys, neg_keys, neg_bd is not None)
  out = _rows_loss(q_bd, cands, labels, scale, cand_keys, cols)
  sym = _rows_loss(c_bd, q_bd, labels, scale, cand_keys, cand_keys)[0] if symmetric else None
  return _finish(*out, b, sym)


def infonce_shard_map(q_bd, c_bd, scale, *, mesh, neg_bd=None, symmetric=False,
                      chunk: int | None = None, cand_keys=None, neg_keys=None):
  """InfoNCE with an explicit `all_gather` of the candidates over the batch mesh axes.

  With `chunk`, each device streams the gathered candidates `chunk` rows at a time, so its
  temporary memory is local batch x chunk (plus the gathered [global batch, D] embeddings).
  Keys: as `infonce_global`.
  """
  has_neg, keyed = neg_bd is not None, cand_keys is not None
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)

  def local(q, c, scale, *rest):
    rest = list(rest)
    neg = rest.pop(0) if has_neg else None
    ck, nk = (rest.pop(0), rest.pop(0) if has_neg else None) if keyed else (None, None)
    gather = functools.partial(jax.lax.all_gather, axis_name=axes, tiled=True)
    b_local = q.shape[0]
    offset = jax.lax.axis_index(axes) * b_local
    cands = c_all = gather(c)
    if has_neg:
      cands = jnp.concatenate([c_all, gather(neg)])
    ck_all = None if ck is None else gather(ck)
    cols = _all_keys(ck_all, None if nk is None else gather(nk), has_neg)
    labels = offset + jnp.arange(b_local)
    rows = (functools.partial(_rows_loss_chunked, chunk=chunk) if chunk else _rows_loss)
    out = rows(q, cands, labels, scale, row_keys=ck, col_keys=cols)
    sums = [jax.lax.psum(x, axes) for x in out]
    if symmetric:
      sums.append(jax.lax.psum(
        rows(c, gather(q), labels, scale, row_keys=ck, col_keys=ck_all)[0], axes))
    return tuple(sums)

  spec, key_spec = P(axes, None), P(axes)
  args = [q_bd, c_bd, scale] + ([neg_bd] if has_neg else [])
  specs = [spec, spec, P()] + ([spec] if has_neg else [])
  if keyed:
    args += [cand_keys] + ([neg_keys] if has_neg else [])
    specs += [key_spec] * (2 if has_neg else 1)
    if has_neg and neg_keys is None:
      raise ValueError("cand_keys given without neg_keys for the hard negatives")
  fn = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=P(), check_vma=False)
  sums = fn(*args)
  return _finish(*sums[:5], q_bd.shape[0], sums[5] if symmetric else None)


def infonce_chunked(q_bd, c_bd, scale, *, mesh, chunk: int, neg_bd=None, symmetric=False,
                    cand_keys=None, neg_keys=None):
  """`infonce_shard_map` streaming candidates in chunks (memory linear in the global batch)."""
  return infonce_shard_map(q_bd, c_bd, scale, mesh=mesh, neg_bd=neg_bd, symmetric=symmetric,
                           chunk=chunk, cand_keys=cand_keys, neg_keys=neg_keys)
