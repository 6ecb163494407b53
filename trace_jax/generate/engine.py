"""The generation engine: prefill, insert into a slot, decode; slot-based continuous batching.

Shaped after JetStream / MaxText's engine (prefill -> insert -> generate), kept ours because the
encoder needs what serving engines do not expose: the hidden state of the token before the stop.

- `prefill` runs prompts through the model once: the hidden state and next-token logits at one
  position per row, and the prompt's KV cache.
- `Engine.submit` copies rows of a prefill's cache into free slots of the engine's decode buffer
  (each row keeps its own write index, `KVCache.index` [B], so a row that joins late needs no more
  cache than its prompt and its output).
- `Engine.step` decodes every active slot for up to `chunk` tokens in one on-device
  `while_loop` (no host round trip per token); each row stops on its own, at a stop id or after
  its `max_new_tokens` tokens (transformers' semantics: the stop id is the last token returned). The
  loop ends early when every row has stopped or when `refill_at` rows have finished, so that a
  caller with prompts waiting gives their slots away at once (continuous batching). Between
  chunks the buffer shrinks to the rows still active (padded to a few sizes, so few programs
  compile); on a mesh whose devices all hold the model, small buffers live on one device (a
  decode step waiting on every device for a few rows costs more than it splits).
- Tokens are chosen by `sampling.next_tokens`: greedy, or temperature / top-k / top-p with a
  key from the row's own seed and position, so a row's output does not depend on its batch,
  slot or neighbours.

`Engine.run` drives all of it for a stream of requests (`Request`: prompt ids, an image's
pixels, a seed); `api.generate` is the plain function over transformers-style inputs, and the
routing encoder (`infer/encode.py`) decodes its reasoning rows with the same engine.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from trace_jax import sharding
from trace_jax.generate import batching
from trace_jax.generate.sampling import Sampling, next_tokens
from trace_jax.model.decoder import KVCache
from trace_jax.model.qwen_vl import QwenVL
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


@dataclasses.dataclass(frozen=True)
class Finished:
  """A row that stopped."""

  tag: Any  # What the caller submitted it with.
  tokens: list[int]  # New tokens (the prefill's first included), the stop id last if reached.
  hidden: np.ndarray  # [D] float32 last-layer state of the last token fed (before the stop).
  capped: bool  # Stopped at max_new_tokens without a stop id.


@dataclasses.dataclass(frozen=True)
class Request:
  """A prompt for `Engine.run`: token ids (with `<|image_pad|>`s for its image), the image's
  [P, C] pixels at the engine's grid (or None), a sampling seed and the caller's tag."""

  ids: Sequence[int]
  pixels: np.ndarray | None = None
  seed: int = 0
  tag: Any = None
  max_new_tokens: int = 0  # 0: the engine's.


# Jitted functions take the model split once (`nnx.split`): `nnx.jit` would walk the module's
# graph on every call, which costs more than a decoding step of a small model.
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
def _insert(buf: Slots, cache: KVCache, src, dst, index, tokens, seeds, limits) -> Slots:
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
def _gather(buf: Slots, idx, live) -> Slots:
  """A buffer of rows `idx` of `buf`; rows where `live` is False are free."""
  take = lambda x: x[idx]  # noqa: E731
  c = buf.cache
  cache = KVCache(c.k_lbksh[:, idx], c.v_lbksh[:, idx], c.valid_bs[idx], c.index[idx],
                  c.next_position_b[idx])
  return Slots(cache, take(buf.tokens), take(buf.counts), take(buf.active) & live,
               take(buf.seeds), take(buf.limits), take(buf.hidden), take(buf.capped))


@jax.jit
def _deactivate(buf: Slots, rows) -> Slots:
  return dataclasses.replace(buf, active=buf.active.at[rows].set(False))


def empty_slots(cfg, rows: int, cache_len: int) -> Slots:
  return Slots(KVCache.zeros(cfg, rows, cache_len, per_row=True), jnp.zeros((rows,), jnp.int32),
               jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), bool),
               jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), jnp.int32),
               jnp.zeros((rows, cfg.text.width), jnp.float32), jnp.zeros((rows,), bool))


def rows_bucket(n: int) -> int:
  """The smallest of 1, 2, 3, 4, 6, 8, 12, ... (powers of two and 1.5x them) that holds `n`
  rows: at most 2 programs per power of two, and at most a third of a decode batch is padding
  (a decoding step costs in proportion to its rows on a CPU)."""
  p = batching.bucket(n)
  return 3 * p // 4 if p >= 4 and 3 * p // 4 >= n else p


def padded(idx: np.ndarray, size: int) -> np.ndarray:
  """`idx` repeated at its first entry up to `size` (repeats copy the same row again)."""
  idx = np.asarray(idx)
  return np.concatenate([idx, np.repeat(idx[:1], size - len(idx))]).astype(np.int32)


class Engine:
  """Continuous batching over a decode buffer of at most `capacity` rows (see the module)."""

  def __init__(self, model: QwenVL, *, capacity: int, cache_len: int, max_new_tokens: int,
               stop_ids: Sequence[int] = (), sampling: Sampling = Sampling(), chunk: int = 16,
               mesh: jax.sharding.Mesh | None = None, one_device_rows: int = 0):
    """`cache_len`: slots per row (its prompt, then its output). `mesh`: the model's; decode
    batches of more than `one_device_rows` rows split over its batch axes, smaller ones run on
    one device when every device holds the whole model (0: always on the mesh)."""
    if chunk < 1 or capacity < 1 or max_new_tokens < 1:
      raise ValueError(f"chunk={chunk}, capacity={capacity}, max_new_tokens={max_new_tokens}: "
                       "expected >= 1")
    self.model, self.mesh, self.sampling = model, mesh, sampling
    self.capacity, self.cache_len, self.chunk = capacity, cache_len, chunk
    self.max_new_tokens = max_new_tokens
    self.stop_ids = jnp.asarray(tuple(stop_ids) or (-1,), jnp.int32)
    self._split = nnx.split(model)
    self._device = _replica_device(self._split[1], mesh) if one_device_rows else None
    self._one_split = self._split
    if self._device is not None:
      self._one_split = (self._split[0], _on_device(self._split[1], self._device))
    self._one_rows = one_device_rows if self._device is not None else 0
    self._buf: Slots | None = None
    self._on_one = False
    self._tags: list[Any] = []  # Per buffer row: the caller's tag, or None for a free row.
    self._tokens: list[list[int]] = []

  @property
  def active(self) -> int:
    return sum(t is not None for t in self._tags)

  @property
  def free(self) -> int:
    return self.capacity - self.active

  def submit(self, cache: KVCache, rows: np.ndarray, index: np.ndarray, tokens: np.ndarray,
             seeds: np.ndarray, tags: Sequence[Any], limits: np.ndarray | None = None) -> int:
    """Inserts as many of `rows` (rows of a prefill's `cache`: their next write slot `index`,
    their first new token `tokens`, which is no stop id, their `seeds` and the most tokens each
    may write, `limits`, default `max_new_tokens`) as there are free slots; returns how many."""
    k = min(len(rows), self.free)
    if not k:
      return 0
    held = [i for i, t in enumerate(self._tags) if t is not None]
    if self._buf is None or len(self._tags) - len(held) < k:
      self._resize(held, len(held) + k)
    dst = [i for i, t in enumerate(self._tags) if t is None][:k]
    size = batching.bucket(k)
    cache = self._place(cache)
    if limits is None:
      limits = np.full(k, self.max_new_tokens)
    self._buf = _insert(self._buf, cache, *(jnp.asarray(padded(x, size)) for x in (
      rows[:k], dst, index[:k], tokens[:k], seeds[:k], limits[:k])))
    for d, tag, token in zip(dst, tags[:k], tokens[:k]):
      self._tags[d], self._tokens[d] = tag, [int(token)]
    return k

  def step(self, refill_at: int = 0, shrink: bool = True) -> list[Finished]:
    """One chunk of decoding of every active row (ending early once `refill_at` > 0 rows have
    finished); returns the rows that stopped. `shrink=False` keeps the buffer's size for rows
    about to be submitted (shrinking and growing back would copy every cache twice)."""
    held = [i for i, t in enumerate(self._tags) if t is not None]
    if not held:
      return []
    if shrink and self._size(len(held)) < len(self._tags):
      held = self._resize(held, len(held))
    split = self._one_split if self._on_one else self._split
    with jax.set_mesh(self.mesh) if self.mesh is not None and not self._on_one else _nothing():
      self._buf, written = decode_chunk(
        *split, self._buf, self.stop_ids, jnp.int32(refill_at or len(self._tags) + 1),
        sampling=self.sampling, steps=self.chunk)
    written, active = np.asarray(written), np.asarray(self._buf.active)
    done = [i for i in held if not active[i]]
    hidden = np.asarray(self._buf.hidden)[done] if done else None
    capped = np.asarray(self._buf.capped)
    out = []
    for i in held:
      self._tokens[i] += [int(t) for t in written[i] if t >= 0]
    for j, i in enumerate(done):
      out.append(Finished(self._tags[i], self._tokens[i], hidden[j], bool(capped[i])))
      self._tags[i], self._tokens[i] = None, []
    return out

  def cancel(self, tags: Iterable[Any]) -> list[Finished]:
    """Stops the rows holding `tags` now (a stop string seen by the caller); returns them."""
    wanted = set(tags)
    rows = [i for i, t in enumerate(self._tags) if t is not None and t in wanted]
    if not rows:
      return []
    self._buf = _deactivate(self._buf, jnp.asarray(rows, jnp.int32))
    hidden = np.asarray(self._buf.hidden)
    out = [Finished(self._tags[i], self._tokens[i], hidden[i], False) for i in rows]
    for i in rows:
      self._tags[i], self._tokens[i] = None, []
    return out

  def tokens_of(self, tag: Any) -> list[int]:
    """The tokens an active row has written so far."""
    return next(self._tokens[i] for i, t in enumerate(self._tags) if t == tag)

  def drain(self) -> list[Finished]:
    """Decodes until every row has stopped; returns them."""
    out = []
    while self.active:
      out += self.step()
    return out

  def run(self, requests: Iterable[Request], *, grid: Sequence[int] | None = None,
          buckets: Sequence[int] = (256,), batch_size: int = 8, stop_strings: Sequence[str] = (),
          decode=None, prefix: Sequence[int] = ()) -> Iterator[Finished]:
    """Generates every request, yielding each as it finishes (order of finishing). Prompts are
    prefilled `batch_size` at a time (requests with images apart from those without, each
    image resized by the caller to `grid`) whenever at least a quarter of the slots are free.
    `stop_strings` (with `decode`, token ids -> text) stop a row whose text contains one; its
    tokens are then cut right after it. `prefix`: text tokens every request starts with (a
    task's template); their keys and values are computed once and every prefill attends to
    them (`buckets` then size the rest of each prompt)."""
    pending = collections.deque(requests)
    refill = max(1, self.capacity // 4)
    layout = None if grid is None else batching.image_layout(self.model.cfg, grid)
    shared = self._prefix_cache(list(prefix)) if len(prefix) else None
    while pending or self.active:
      while pending and self.free >= min(refill, len(pending)):
        batch = _take_batch(pending, min(batch_size, self.free))
        yield from self._prefill_and_submit(batch, layout, grid, buckets, list(prefix), shared)
      finished = self.step(refill_at=refill if pending else 0, shrink=not pending)
      if stop_strings:
        finished += self._stop_at_strings(stop_strings, decode)
      yield from (_cut_at_string(f, stop_strings, decode) for f in finished)

  def _prefix_cache(self, prefix: list[int]) -> KVCache:
    """The one-row cache of a text prefix."""
    if self.model.cfg.image_token_id in prefix:
      raise ValueError("a shared prefix must be text only (images go after it)")
    packed = batching.pack([prefix], [None], self.model.cfg, None, 1, (len(prefix),))
    with jax.set_mesh(self.mesh) if self.mesh is not None else _nothing():
      return prefill(*self._split, *batching.on_devices(packed, None), None,
                     jnp.asarray([len(prefix) - 1]), max_len=len(prefix))[2]

  def _prefill_and_submit(self, batch: list[Request], layout, grid, buckets, prefix: list[int],
                          shared: KVCache | None) -> list[Finished]:
    """Prefills requests (after their shared `prefix`, whose cache is `shared`) and submits the
    rows whose first token is not the end; returns those that ended at once."""
    if grid is None and batch[0].pixels is not None:
      raise ValueError("requests with images need the engine's image grid (run(grid=...))")
    p = len(prefix)
    for r in batch:
      if list(r.ids[:p]) != prefix or len(r.ids) <= p:
        raise ValueError(f"request {r.tag!r} does not extend the shared prefix")
    packed = batching.pack([r.ids[p:] for r in batch], [r.pixels for r in batch],
                           self.model.cfg, grid, batching.bucket(len(batch)), buckets, offset=p)
    last = packed.lengths - 1
    with jax.set_mesh(self.mesh) if self.mesh is not None else _nothing():
      h, logits, cache = prefill(
        *self._split, *batching.on_devices(packed, self.mesh),
        None if packed.pixels is None else layout, jnp.asarray(last),
        max_len=p + packed.ids.shape[1], prefix=shared)
    seeds = np.asarray([r.seed for r in batch] + [0] * (len(last) - len(batch)), np.int32)
    first = np.asarray(next_tokens(logits, self.sampling, jnp.asarray(seeds),
                                   jnp.zeros(len(seeds), jnp.int32)))[:len(batch)]
    limits = np.asarray([r.max_new_tokens or self.max_new_tokens for r in batch])
    if limits.max() > self.max_new_tokens:
      raise ValueError(f"a request asks for {limits.max()} new tokens; the engine's cache holds "
                       f"{self.max_new_tokens}")
    ended = np.isin(first, np.asarray(self.stop_ids)) | (limits == 1)
    h = np.asarray(h)
    done = [Finished(batch[i].tag, [int(first[i])], h[i], not np.isin(first[i], self.stop_ids))
            for i in np.flatnonzero(ended)]
    go = np.flatnonzero(~ended)
    if len(go):
      self.submit(cache, go, p + packed.lengths[go], first[go], seeds[go],
                  [batch[i].tag for i in go], limits[go])
    return done

  def _stop_at_strings(self, stop_strings, decode) -> list[Finished]:
    hits = [t for t in self._tags if t is not None
            and any(s in decode(self.tokens_of(t)) for s in stop_strings)]
    return self.cancel(hits) if hits else []

  def _size(self, n: int) -> int:
    """Buffer rows for `n` active rows: 1, 2, 3, 4, 6, 8, ... on one device, powers of two
    split over the mesh."""
    on_one = self.mesh is None or batching.bucket(n) <= self._one_rows
    return rows_bucket(n) if on_one else batching.bucket(n)

  def _resize(self, held: list[int], n: int) -> list[int]:
    """A buffer of `_size(n)` rows holding the `held` rows first (the rest free), on one device
    or the mesh as its size asks; returns the rows' new indices."""
    size = max(self._size(n), len(held))
    if self._buf is None:
      self._buf, self._tags, self._tokens = (empty_slots(self.model.cfg, size, self.cache_len),
                                             [None] * size, [[] for _ in range(size)])
      self._buf = self._placed(self._buf, size)
      return []
    idx = padded(np.asarray(held or [0]), size)
    live = np.arange(size) < len(held)
    self._buf = _gather(self._buf, jnp.asarray(idx), jnp.asarray(live))
    self._buf = self._placed(self._buf, size)
    self._tags = [self._tags[i] for i in held] + [None] * (size - len(held))
    self._tokens = [self._tokens[i] for i in held] + [[] for _ in range(size - len(held))]
    return list(range(len(held)))

  def _placed(self, buf: Slots, size: int) -> Slots:
    self._on_one = self._device is not None and batching.bucket(size) <= self._one_rows
    if self._on_one:
      return jax.device_put(buf, self._device)
    if self.mesh is None:
      return buf
    return _put_slots(buf, self.mesh)

  def _place(self, cache: KVCache) -> KVCache:
    """A prefill's cache where the buffer lives."""
    if self._on_one:
      return jax.device_put(cache, self._device)
    if self.mesh is None:
      return cache
    return _put_cache(cache, self.mesh)


class _nothing:
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False


def _take_batch(pending: collections.deque, n: int) -> list[Request]:
  """Up to `n` requests from the front, all with an image or all without (the first's kind)."""
  kind = pending[0].pixels is None
  out, kept = [], collections.deque()
  while pending and len(out) < n:
    r = pending.popleft()
    (out if (r.pixels is None) == kind else kept).append(r)
  pending.extendleft(reversed(kept))
  return out


def _cut_at_string(f: Finished, stop_strings, decode) -> Finished:
  """`f` with its tokens cut after the first stop string (the fewest tokens whose text has it)."""
  if not stop_strings or not any(s in decode(f.tokens) for s in stop_strings):
    return f
  n = next(n for n in range(1, len(f.tokens) + 1)
           if any(s in decode(f.tokens[:n]) for s in stop_strings))
  return dataclasses.replace(f, tokens=f.tokens[:n])


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


def _put_cache(cache: KVCache, mesh) -> KVCache:
  return jax.device_put(cache, cache_shardings(cache, mesh))


def _put_slots(buf: Slots, mesh) -> Slots:
  return jax.device_put(buf, slots_shardings(buf, mesh))


def _replica_device(state, mesh: jax.sharding.Mesh | None):
  """The first device of `mesh` when every array of `state` is fully replicated on it (each
  device holds the whole model) and one process drives it; None otherwise (no mesh, a sharded
  model, or several processes, whose caches one device could not read)."""
  if (mesh is None or jax.process_count() > 1
      or not all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state))):
    return None
  return mesh.devices.flat[0]


def _on_device(state, device):
  """Fully replicated `state` as single-device arrays on `device`: its own copies (no transfer)."""
  def local(x):
    shard = next((s.data for s in x.addressable_shards if s.device == device), None)
    return shard if shard is not None else jax.device_put(x, device)
  return jax.tree.map(local, state)
