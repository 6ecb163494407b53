"""The engine's device side: the decode buffer (`Slots`), its shardings, and the jitted programs
that prefill prompts, insert rows into slots, decode a chunk of tokens and gather rows.

Jitted functions take the model split once (`nnx.split`): `nnx.jit` would walk the module's graph
on every call, which costs more than a decoding step of a small model. `tools/aot_compile` lowers
`prefill` and `decode_chunk` for TPU slices with `slots_shardings`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from trace_jax import sharding
from trace_jax.generate.sampling import Sampling, next_tokens
from trace_jax.model.decoder import KVCache
from trace_jax.model.readout import normalize


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
  """The decode buffer: R rows, each a slot that holds one sequence or is free."""

  cache: KVCache  # Per-row write index.
  tokens: jax.Array  # [R] each row's latest token, not yet fed.
  counts: jax.Array  # [R] tokens the row has written (the latest included).
  active: jax.Array  # [R] still generating.
  seeds: jax.Array  # [R] the row's sampling seed.
  limits: jax.Array  # [R] the most tokens the row may write.
  hidden: jax.Array  # [R, D] float32 state of the row's last fed token.
  capped: jax.Array  # [R] stopped at max_new_tokens without a stop id.


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "unit"))
def prefill(graphdef, state, ids, mask, positions, pixels, layout, read, max_len: int = 0,
            unit: bool = False, prefix: KVCache | None = None):
  """(hidden state at position `read` [B] of each row (L2-normalised with `unit`), its
  next-token logits, and (max_len > 0) the prompt's cache of `max_len` slots).

  With `prefix` (the one-row cache of tokens every row starts with), `ids` are the tokens after
  it (their `positions` those of the whole sequence): the rows attend to the prefix's keys and
  values instead of recomputing them, and the cache holds prefix then rows."""
  model = nnx.merge(graphdef, state)
  cache = KVCache.zeros(model.cfg, ids.shape[0], max_len) if max_len else None
  if prefix is not None:
    cache = _from_prefix(prefix, ids.shape[0], max_len)
  out = model(ids, mask, pixels, position_ids=positions, vision_layout=layout,
              return_logits=False, cache=cache)
  h = jnp.take_along_axis(out.hidden_states, read[:, None, None], axis=1)[:, 0]
  return (normalize(h) if unit else h.astype(jnp.float32)), model.logits(h), out.cache


def _from_prefix(prefix: KVCache, rows: int, max_len: int) -> KVCache:
  """A cache of `max_len` slots for `rows` rows that all start with the one-row `prefix`."""
  p = prefix.valid_bs.shape[1]
  pad = ((0, 0), (0, 0), (0, 0), (0, max_len - p), (0, 0))

  def grow(x):
    x = jnp.pad(x, pad)
    return jnp.broadcast_to(x, (x.shape[0], rows, *x.shape[2:]))

  return KVCache(grow(prefix.k_lbksh), grow(prefix.v_lbksh),
                 jnp.broadcast_to(jnp.pad(prefix.valid_bs, ((0, 0), (0, max_len - p))),
                                  (rows, max_len)),
                 jnp.asarray(p, jnp.int32), jnp.broadcast_to(prefix.next_position_b, (rows,)))


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "steps"),
                   donate_argnums=(2,))
def decode_chunk(graphdef, state, buf: Slots, stop_ids, refill_at, *,
                 sampling: Sampling, steps: int):
  """Up to `steps` tokens for every active row; ends early when no row is active or when
  `refill_at` rows have finished. Returns (buffer, tokens written [R, steps], -1 where none)."""
  model = nnx.merge(graphdef, state)
  started = buf.active

  def body(c):
    i, b, written = c
    out = model.decode(b.tokens[:, None], b.cache)
    h = out.hidden_states[:, 0]
    nxt = next_tokens(model.logits(h), sampling, b.seeds, b.counts)
    act = b.active
    stop = jnp.isin(nxt, stop_ids)
    counts = b.counts + act
    going = act & ~stop & (counts < b.limits)
    written = written.at[:, i].set(jnp.where(act, nxt, -1))
    b = Slots(out.cache, jnp.where(act, nxt, b.tokens), counts, going, b.seeds, b.limits,
              jnp.where(act[:, None], h.astype(jnp.float32), b.hidden),
              b.capped | (act & ~going & ~stop))
    return i + 1, b, written

  def cond(c):
    i, b, _ = c
    return (i < steps) & jnp.any(b.active) & (jnp.sum(started & ~b.active) < refill_at)

  written = jnp.full((buf.tokens.shape[0], steps), -1, jnp.int32)
  _, buf, written = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), buf, written))
  return buf, written


@functools.partial(jax.jit, donate_argnums=0)
def insert(buf: Slots, cache: KVCache, src, dst, index, tokens, seeds, limits) -> Slots:
  """`buf` with rows `dst` holding rows `src` of a prefill's cache (its slots, then invalid
  ones), writing next at `index`, latest token `tokens`, one token written, active."""
  slots = buf.cache.valid_bs.shape[1]
  pad = ((0, 0), (0, 0), (0, 0), (0, slots - cache.valid_bs.shape[1]), (0, 0))
  c = buf.cache
  rows = lambda x: jnp.pad(x[:, src], pad).astype(c.k_lbksh.dtype)  # noqa: E731
  new = KVCache(c.k_lbksh.at[:, dst].set(rows(cache.k_lbksh)),
                c.v_lbksh.at[:, dst].set(rows(cache.v_lbksh)),
                c.valid_bs.at[dst].set(jnp.pad(cache.valid_bs[src], pad[2:4])),
                c.index.at[dst].set(index),
                c.next_position_b.at[dst].set(cache.next_position_b[src]))
  return Slots(new, buf.tokens.at[dst].set(tokens), buf.counts.at[dst].set(1),
               buf.active.at[dst].set(True), buf.seeds.at[dst].set(seeds),
               buf.limits.at[dst].set(limits), buf.hidden.at[dst].set(0.0),
               buf.capped.at[dst].set(False))


@jax.jit
def gather(buf: Slots, idx, live) -> Slots:
  """A buffer of rows `idx` of `buf`; rows where `live` is False are free."""
  take = lambda x: x[idx]  # noqa: E731
  c = buf.cache
  cache = KVCache(c.k_lbksh[:, idx], c.v_lbksh[:, idx], c.valid_bs[idx], c.index[idx],
                  c.next_position_b[idx])
  return Slots(cache, take(buf.tokens), take(buf.counts), take(buf.active) & live,
               take(buf.seeds), take(buf.limits), take(buf.hidden), take(buf.capped))


@jax.jit
def deactivate(buf: Slots, rows) -> Slots:
  """`buf` with rows `rows` stopped (a stop string the host saw)."""
  return dataclasses.replace(buf, active=buf.active.at[rows].set(False))


def empty_slots(cfg, rows: int, cache_len: int) -> Slots:
  """A decode buffer of `rows` free rows of `cache_len` slots each."""
  return Slots(KVCache.zeros(cfg, rows, cache_len, per_row=True), jnp.zeros((rows,), jnp.int32),
               jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), bool),
               jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), jnp.int32),
               jnp.zeros((rows, cfg.text.width), jnp.float32), jnp.zeros((rows,), bool))


def cache_shardings(cache: KVCache, mesh) -> KVCache:
  """NamedShardings of a cache on `mesh`: rows over the batch axes, KV heads over `tensor`."""
  def named(x, names):
    return NamedSharding(mesh, sharding.logical_to_spec(names, x.shape, mesh))
  return KVCache(named(cache.k_lbksh, (None, "act_batch", "act_kv_heads", None, None)),
                 named(cache.v_lbksh, (None, "act_batch", "act_kv_heads", None, None)),
                 named(cache.valid_bs, ("act_batch", None)),
                 named(cache.index, ("act_batch",) if cache.index.ndim else ()),
                 named(cache.next_position_b, ("act_batch",)))


def slots_shardings(buf: Slots, mesh) -> Slots:
  """NamedShardings of a decode buffer on `mesh` (its rows over the batch axes)."""
  def row(x, extra=0):
    return NamedSharding(mesh, sharding.logical_to_spec(("act_batch",) + (None,) * extra,
                                                        x.shape, mesh))
  return Slots(cache_shardings(buf.cache, mesh), row(buf.tokens), row(buf.counts),
               row(buf.active), row(buf.seeds), row(buf.limits), row(buf.hidden, 1),
               row(buf.capped))


def put_cache(cache: KVCache, mesh) -> KVCache:
  return jax.device_put(cache, cache_shardings(cache, mesh))


def put_slots(buf: Slots, mesh) -> Slots:
  return jax.device_put(buf, slots_shardings(buf, mesh))


def replica_device(state, mesh: jax.sharding.Mesh | None):
  """The first device of `mesh` when every array of `state` is fully replicated on it (each
  device holds the whole model) and one process drives it; None otherwise (no mesh, a sharded
  model, or several processes, whose caches one device could not read)."""
  if (mesh is None or jax.process_count() > 1
      or not all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state))):
    return None
  return mesh.devices.flat[0]


def on_device(state, device):
  """Fully replicated `state` as single-device arrays on `device`: its own copies (no transfer)."""
  def local(x):
    shard = next((s.data for s in x.addressable_shards if s.device == device), None)
    return shard if shard is not None else jax.device_put(x, device)
  return jax.tree.map(local, state)
