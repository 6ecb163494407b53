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
pixels or a function that decodes them, a seed), read a bounded window ahead of admission with
the images decoded by worker threads (`streaming.py`); `api.generate` is the plain function
over transformers-style inputs, and the routing encoder (`infer/encode.py`) decodes its
reasoning rows with the same engine. The jitted programs and the decode buffer live in
`programs.py`; this module is the host-side bookkeeping.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trace_jax.generate import batching, programs, streaming
from trace_jax.generate.programs import Slots, prefill
from trace_jax.generate.sampling import Sampling, next_tokens
from trace_jax.model.decoder import KVCache
from trace_jax.model.qwen_vl import QwenVL


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
  [P, C] pixels at the engine's grid (or None), a sampling seed and the caller's tag. `pixels`
  may be a function returning them: the engine decodes it on a worker thread just before the
  request is admitted (`streaming.Window`)."""

  ids: Sequence[int]
  pixels: np.ndarray | Callable[[], np.ndarray] | None = None
  seed: int = 0
  tag: Any = None
  max_new_tokens: int = 0  # 0: the engine's.


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
    self._device = programs.replica_device(self._split[1], mesh) if one_device_rows else None
    self._one_split = self._split
    if self._device is not None:
      self._one_split = (self._split[0], programs.on_device(self._split[1], self._device))
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
    self._buf = programs.insert(self._buf, cache, *(jnp.asarray(padded(x, size)) for x in (
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
      self._buf, written = programs.decode_chunk(
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
    self._buf = programs.deactivate(self._buf, jnp.asarray(rows, jnp.int32))
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

  def release(self) -> None:
    """Frees the decode buffer once every row has finished: the next `submit` starts from an
    empty one, so a call's programs do not depend on the buffer size earlier calls left."""
    if self.active:
      raise ValueError(f"{self.active} rows are still decoding")
    self._buf, self._tags, self._tokens = None, [], []

  def run(self, requests: Iterable[Request], *, grid: Sequence[int] | None = None,
          buckets: Sequence[int] = (256,), batch_size: int = 8, stop_strings: Sequence[str] = (),
          decode=None, prefix: Sequence[int] = (), prefetch: int = 0, workers: int = 2,
          on_error: streaming.OnError | None = None) -> Iterator[Finished]:
    """Generates every request, yielding each as it finishes (order of finishing). Prompts are
    prefilled `batch_size` at a time (requests with images apart from those without, each
    image resized by the caller to `grid`) whenever at least a quarter of the slots are free.
    `stop_strings` (with `decode`, token ids -> text) stop a row whose text contains one; its
    tokens are then cut right after it. `prefix`: text tokens every request starts with (a
    task's template); their keys and values are computed once and every prefill attends to
    them (`buckets` then size the rest of each prompt).

    `requests` is read lazily, at most `prefetch` (0: 4 batches) ahead of admission; lazy images
    (`Request.pixels` a function) decode on `workers` threads meanwhile, so at most `prefetch +
    batch_size` decoded images are alive. A decode that raises is passed to `on_error(request,
    error)` (the request is then dropped; re-raise to stop), or raised when there is none."""
    prefetch = prefetch or 4 * batch_size
    if prefetch < batch_size:
      raise ValueError(f"prefetch={prefetch} is below batch_size={batch_size}")
    pending = streaming.Window(requests, prefetch, workers, on_error)
    refill = max(1, self.capacity // 4)
    layout = None if grid is None else batching.image_layout(self.model.cfg, grid)
    shared = self._prefix_cache(list(prefix)) if len(prefix) else None
    try:
      while pending or self.active:
        while pending and self.free >= min(refill, len(pending)):
          batch = pending.take(min(batch_size, self.free))
          if batch:
            done = self._prefill_and_submit(batch, layout, grid, buckets, list(prefix), shared)
            del batch  # Its images go now, not when the next batch is taken.
            yield from done
        finished = self.step(refill_at=refill if pending else 0, shrink=not pending)
        if stop_strings:
          finished += self._stop_at_strings(stop_strings, decode)
        yield from (_cut_at_string(f, stop_strings, decode) for f in finished)
    finally:
      pending.close()

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
      self._buf = programs.empty_slots(self.model.cfg, size, self.cache_len)
      self._tags, self._tokens = [None] * size, [[] for _ in range(size)]
      self._buf = self._placed(self._buf, size)
      return []
    idx = padded(np.asarray(held or [0]), size)
    live = np.arange(size) < len(held)
    self._buf = programs.gather(self._buf, jnp.asarray(idx), jnp.asarray(live))
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
    return programs.put_slots(buf, self.mesh)

  def _place(self, cache: KVCache) -> KVCache:
    """A prefill's cache where the buffer lives."""
    if self._on_one:
      return jax.device_put(cache, self._device)
    if self.mesh is None:
      return cache
    return programs.put_cache(cache, self.mesh)


class _nothing:
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False


def _cut_at_string(f: Finished, stop_strings, decode) -> Finished:
  """`f` with its tokens cut after the first stop string (the fewest tokens whose text has it);
  not capped then, as a row the host stopped (`cancel`) is not: it ended at its stop string even
  when a decode chunk ran it on to the token limit."""
  if not stop_strings or not any(s in decode(f.tokens) for s in stop_strings):
    return f
  n = next(n for n in range(1, len(f.tokens) + 1)
           if any(s in decode(f.tokens[:n]) for s in stop_strings))
  return dataclasses.replace(f, tokens=f.tokens[:n], capped=False)
