"""The implicit-routing encoder: candidates in one pass; queries prefill, then reason only if the
model chooses to (TRACE.md, "Inference: implicit routing").

`adaptive` (default): one batched prefill; rows whose greedy first token is `<|emb|>` take the
hidden state of the last prompt token (the pre-token) from that same pass. Only the other rows
decode greedily with the KV cache until `<|emb|>` or `max_new_tokens`. Their caches wait in a pool
across prefill batches until `batch_size` rows (or the last batch) are in, and then decode
together (`_Pool`): with few reasoning queries (4% on MSCOCO: one or two per batch of 32),
decoding each batch's own would pay a whole greedy loop's fixed per-step cost per batch.
`decode_chunk` steps run as one on-device loop (no host round trip per token; it ends early once
every row has stopped), and between chunks the decode batch is compacted to the rows still
reasoning (padded to a few sizes, so few programs compile); a finished row rides along at most
to its chunk's end. The prefill caches the prompt only; the pool adds `max_new_tokens` slots for
the reasoning. With a `mesh`, every batch's rows are split over the devices; on a mesh where
every device holds the whole model, small decode batches run on one device (see
`Encoder.__init__`). `direct` forces `<|emb|>` first; `always_reason` forbids it as the first
token.

Prompts are cut where tokens are made (`data/prompts.py`): a text longer than the encoder's
`query_text_tokens` / `cand_text_tokens`, or one that does not fit the largest prompt bucket, loses
its tail (instruction, image tokens and rule stay whole); `Encoded.truncated` says by how many
tokens. Items without an image are batched apart from those with one and run no vision tower. A
reasoning row that writes `max_new_tokens` without reaching `<|emb|>` is read at its last token,
a position never trained as a readout: `Encoded.capped` marks it. Errors name the item's `id`.

Readout: the pre-token (the paper's choice) comes from the passes above. The other readouts of
`loss.readout` (`emb`, `end_of_reasoning`) need states the routing passes do not compute, so
after routing and decoding one more forward pass runs over each row's prompt + generated text +
`<|emb|>` and reads the position the train step reads (`model.readout.readout_index`); candidates
then feed `<|emb|>` with their prompt. With `cand_reasoning` (the candidate-side reasoning
ablation) candidates use the reasoning candidate prompt and are encoded like adaptive queries.
Retrieval itself is in `retrieval.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trace_jax import sharding
from trace_jax.data import image as image_lib
from trace_jax.data import prompts
from trace_jax.data.tokenizer import Tokenizer
from trace_jax.model.decoder import KVCache
from trace_jax.model.positions import rope_index, vision_layout
from trace_jax.model.qwen_vl import QwenVL
from trace_jax.model.readout import READOUTS, normalize, readout_index

MODES = ("adaptive", "direct", "always_reason")


@dataclasses.dataclass(frozen=True)
class Item:
  """A query or candidate to embed: its text (instruction included) and image path, if any."""

  text: str | None
  image: str | None  # Absolute path or path under the encoder's root.
  id: str = ""  # The qid or did: errors and logs name it.


@dataclasses.dataclass(frozen=True)
class Encoded:
  embeddings: np.ndarray  # [N, D] L2-normalised (the `out` array when one was given).
  texts: list[str]  # The generated reasoning ("" when the row embedded at once).
  reasoned: np.ndarray  # [N] bool: the row wrote at least one token before <|emb|>.
  capped: np.ndarray  # [N] bool: it wrote max_new_tokens without reaching <|emb|>.
  truncated: np.ndarray  # [N] int: tokens cut from its text to fit (0: whole).


# The jitted functions take the model split once (`nnx.split`): `nnx.jit` would walk the module's
# graph on every call, which costs more than a decoding step of a small model.
@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def _prefill(graphdef, state, ids, mask, positions, pixels, layout, read, max_len: int = 0):
  """Unit hidden state at position `read` [B] of each row, its next-token logits, and
  (max_len > 0) the cache."""
  model = nnx.merge(graphdef, state)
  cache = KVCache.zeros(model.cfg, ids.shape[0], max_len) if max_len else None
  out = model(ids, mask, pixels, position_ids=positions, vision_layout=layout,
              return_logits=False, cache=cache)
  h = jnp.take_along_axis(out.hidden_states, read[:, None, None], axis=1)[:, 0]
  return normalize(h), model.logits(h), out.cache


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"))
def _decode_chunk(graphdef, state, tokens, counts, cache, emb_id, max_new, steps: int):
  """Up to `steps` greedy steps in one program, for rows that all reason on entry.

  tokens [B]: each row's latest token, not yet fed; counts [B]: tokens it has written. A row
  stops at `<|emb|>` or `max_new` tokens; the loop ends early once every row has stopped.
  Returns (the unit hidden state of each row's last fed token, the tokens written [B, steps]
  (-1 after the row stopped), next tokens, still reasoning [B], capped [B]: stopped at `max_new`
  with a next token other than `<|emb|>`, cache).
  """
  model = nnx.merge(graphdef, state)
  b = tokens.shape[0]

  def body(c):
    i, tokens, counts, active, capped, h_out, written, cache = c
    out = model.decode(tokens[:, None], cache)
    h = out.hidden_states[:, 0]
    nxt = jnp.argmax(model.logits(h), axis=-1).astype(tokens.dtype)
    h_out = jnp.where(active[:, None], normalize(h), h_out)  # The pre-token once <|emb|> is next.
    going = active & (nxt != emb_id) & (counts < max_new)
    capped = capped | (active & ~going & (nxt != emb_id))
    written = written.at[:, i].set(jnp.where(going, nxt, -1))
    return (i + 1, jnp.where(going, nxt, tokens), counts + going, going, capped, h_out, written,
            out.cache)

  init = (jnp.zeros((), jnp.int32), tokens, counts, jnp.ones((b,), bool), jnp.zeros((b,), bool),
          jnp.zeros((b, model.cfg.text.width), jnp.float32), jnp.full((b, steps), -1, jnp.int32),
          cache)
  _, tokens, _, active, capped, h_out, written, cache = jax.lax.while_loop(
    lambda c: (c[0] < steps) & jnp.any(c[3]), body, init)
  return h_out, written, tokens, active, capped, cache


def _bucket(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _rows_bucket(n: int) -> int:
  """The smallest of 1, 2, 3, 4, 6, 8, 12, ... (powers of two and 1.5x them) that holds `n`
  rows: at most 2 programs per power of two, and at most a third of a decode batch is padding
  (a decoding step costs in proportion to its rows on a CPU)."""
  p = _bucket(n)
  return 3 * p // 4 if p >= 4 and 3 * p // 4 >= n else p


class Encoder:
  """Embeds queries and candidates with a trained model."""

  def __init__(self, model: QwenVL, tok: Tokenizer, *, image_grid: Sequence[int], root: str = "",
               batch_size: int = 32, prompt_buckets: Sequence[int] = (64, 128, 256),
               max_new_tokens: int = 96, compact_prompts: bool = False, decode_chunk: int = 16,
               mesh: jax.sharding.Mesh | None = None, readout: str = "pre_token",
               eor_id: int = -1, cand_reasoning: bool = False, query_text_tokens: int = 0,
               cand_text_tokens: int = 0):
    """The encoder keeps the model's weights as they are now (split once; build a new encoder
    after changing them). `mesh`: the model's mesh; each batch's rows are then split over its
    batch axes (the `act_batch` rule), so every device embeds its share instead of all repeating
    the batch. `readout`, `eor_id`: as the model was trained (`loss.readout`, the marker's id);
    `cand_reasoning`: candidates were trained to write text first (`data.cand_target`);
    `query_text_tokens`, `cand_text_tokens`: cut longer texts (0: only to fit the buckets)."""
    if readout not in READOUTS:
      raise ValueError(f"readout={readout!r}; expected one of {READOUTS}")
    if readout == "end_of_reasoning" and eor_id < 0:
      raise ValueError("readout='end_of_reasoning' needs the end-of-reasoning token id (eor_id)")
    self.readout, self.eor_id, self.cand_reasoning = readout, eor_id, cand_reasoning
    self.model, self.tok, self.root, self.mesh = model, tok, root, mesh
    self._split = nnx.split(model)
    # On a mesh where every device holds the whole model (pure data parallelism), a decode batch
    # no larger than one device's share of a prefill batch decodes on one device instead of
    # splitting its few rows over all of them (each step would then wait on every device: 16
    # steps of one row of the demo model take 4.6 ms on one CPU device, 11-25 ms on the 4-device
    # mesh); larger ones split their rows over the mesh like the prefill.
    self._decode_device = _replica_device(self._split[1], mesh)
    self._decode_split, self._one_device_rows = self._split, 0
    if self._decode_device is not None:
      self._decode_split = (self._split[0], _on_device(self._split[1], self._decode_device))
      self._one_device_rows = max(1, batch_size // mesh.size)
    self.grid = tuple(image_grid)
    self.batch_size, self.buckets = batch_size, tuple(sorted(prompt_buckets))
    self.max_new_tokens, self.compact = max_new_tokens, compact_prompts
    self.text_tokens = {False: query_text_tokens, True: cand_text_tokens}
    if decode_chunk < 1:
      raise ValueError(f"decode_chunk={decode_chunk}; expected >= 1")
    self.decode_chunk = decode_chunk
    cfg = model.cfg
    self.layout = vision_layout(np.asarray([self.grid]), cfg.vision,
                                windowed=cfg.family == "qwen2_5_vl")
    self.patches = int(np.prod(self.grid))
    self.image_tokens = self.patches // cfg.vision.spatial_merge_size**2

  def _on_mesh(self):
    return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

  def _to_decode(self, x: np.ndarray, one: bool) -> jax.Array:
    """Per-row host values where the decode runs: on its one device, else split like the rows
    (or JAX's default placement without a mesh)."""
    x = np.asarray(x, np.int32)
    if one:
      return jax.device_put(x, self._decode_device)
    return jnp.asarray(x) if self.mesh is None else sharding.put(x, self.mesh, ("act_batch",))

  def _place_cache(self, cache: KVCache, one: bool) -> KVCache:
    """The decode cache on the decode's one device, or its rows split over the mesh."""
    if one:
      return jax.device_put(cache, self._decode_device)
    if self.mesh is None:
      return cache
    put = functools.partial(sharding.put, mesh=self.mesh)
    rows = (None, "act_batch", None, None, None)
    return KVCache(put(cache.k_lbksh, names=rows), put(cache.v_lbksh, names=rows),
                   put(cache.valid_bs, names=("act_batch", None)), put(cache.index, names=()),
                   put(cache.next_position_b, names=("act_batch",)))

  def _put(self, ids, mask, positions, pixels):
    """The host batch on the devices: rows split over the mesh's batch axes (when there is one)."""
    if self.mesh is None:
      return ids, mask, positions, pixels
    put = functools.partial(sharding.put, mesh=self.mesh)
    return (put(ids, names=("act_batch", None)), put(mask, names=("act_batch", None)),
            put(positions, names=(None, "act_batch", None)),
            None if pixels is None else put(pixels, names=("act_batch", None, None)))

  def _pixels(self, it: Item) -> np.ndarray:
    full = it.image if not self.root else os.path.join(self.root, it.image)
    if not os.path.isfile(full):  # M-BEIR's rule: a missing image stops, naming the item.
      raise FileNotFoundError(f"{it.id or 'item'}: image not found: {full}")
    try:
      return image_lib.resize_to_grid(full, self.grid[1:])[0]
    except ValueError as e:
      raise ValueError(f"{it.id or 'item'}: {e}") from e

  def _prompt(self, it: Item, candidate: bool) -> prompts.Encoded:
    """The item's prompt (its text cut to the encoder's limit and to fit the largest bucket; a
    query's prefill excludes its target `<|emb|>`, hence the one token more)."""
    n_img = self.image_tokens if it.image else 0
    limits = dict(max_text_tokens=self.text_tokens[candidate],
                  max_len=self.buckets[-1] + (0 if candidate and self.readout == "emb" else 1))
    try:
      if candidate:
        return prompts.encode_candidate(self.tok, it.text, n_img, self.compact,
                                        may_reason=self.cand_reasoning, **limits)
      return prompts.encode_query(self.tok, it.text or "", n_img, None, self.compact, **limits)
    except prompts.PromptTooLongError as e:
      raise ValueError(f"{it.id or 'item'}: {e} (eval.prompt_buckets)") from None

  def _pack(self, seqs: Sequence[Sequence[int]], items: Sequence[Item], grow: bool = False):
    """Right-padded ids, mask, positions and pixels (None when no item has an image) of up to
    `batch_size` sequences, padded to the smallest prompt bucket that fits; `grow`: sequences
    longer than every bucket (prompts with their generated text) take the next power of two."""
    longest = max(map(len, seqs))
    t = next((b for b in self.buckets if b >= longest), _bucket(longest) if grow else None)
    if t is None:
      raise ValueError(f"a prompt of {longest} tokens exceeds the largest bucket {self.buckets}")
    b = self.batch_size
    ids, mask = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    positions = np.zeros((3, b, t), np.int32)
    for i, (s, it) in enumerate(zip(seqs, items)):
      ids[i, :len(s)], mask[i, :len(s)] = s, 1
      grid = np.asarray([self.grid]) if it.image else None
      positions[:, i, :len(s)] = rope_index(np.asarray([s]), None, grid, self.model.cfg)[:, 0]
    mask[len(items):, 0] = 1  # Filler rows: one visible token keeps their softmax defined.
    pixels = None
    if any(it.image for it in items):
      pixels = np.zeros((b, self.patches, self.model.cfg.vision.patch_dim), np.float32)
      for i, it in enumerate(items):
        if it.image:
          pixels[i] = self._pixels(it)
    return ids, mask, positions, pixels

  def _run_prefill(self, batch, read, max_len: int = 0):
    """(unit hidden states at `read`, next-token logits, cache) of a packed batch."""
    with self._on_mesh():
      return _prefill(*self._split, *self._put(*batch), self.layout if batch[3] is not None
                      else None, jnp.asarray(read), max_len=max_len)

  def _read(self, batch, read: Sequence[int]) -> np.ndarray:
    """Unit hidden states [n, D] at positions `read` (one per item) of a packed batch: one
    forward pass."""
    n = len(read)
    read = np.pad(np.asarray(read, np.int32), (0, batch[0].shape[0] - n))
    emb, _, _ = self._run_prefill(batch, read)
    return np.asarray(emb)[:n]

  def _readout(self, seqs, items) -> np.ndarray:
    """Embeddings of full sequences (prompt, generated text, `<|emb|>`) at the trained readout."""
    batch = self._pack(seqs, items, grow=True)
    read = readout_index(jnp.asarray(batch[0]), self.readout, self.tok.emb_id, self.eor_id)
    return self._read(batch, np.asarray(read)[:len(seqs)])

  def encode_candidates(self, items: Sequence[Item], out: np.ndarray | None = None) -> Encoded:
    """Embeddings [N, D] (written into `out` when given, e.g. a memmap): one forward pass per
    batch (with `cand_reasoning`, the adaptive query path with the candidate prompt)."""
    if self.cand_reasoning:
      return self._encode(items, "adaptive", candidate=True, out=out)
    n = len(items)
    out = _output(out, n, self.model.cfg.text.width)
    encs = [self._prompt(it, True) for it in items]
    for rows in self._batches(items):
      seqs = [list(encs[i].ids[:encs[i].prompt_len]) for i in rows]
      if self.readout == "emb":  # The other readouts read the last prompt token here.
        seqs = [s + [self.tok.emb_id] for s in seqs]
      out[rows] = self._read(self._pack(seqs, [items[i] for i in rows]),
                             [len(s) - 1 for s in seqs])
    return Encoded(out, [""] * n, np.zeros(n, bool), np.zeros(n, bool),
                   np.asarray([e.text_cut for e in encs], np.int64))

  def encode_queries(self, items: Sequence[Item], mode: str = "adaptive",
                     out: np.ndarray | None = None) -> Encoded:
    return self._encode(items, mode, candidate=False, out=out)

  def _batches(self, items: Sequence[Item]) -> list[np.ndarray]:
    """Item indices in batches of at most `batch_size`: items without an image first, then those
    with one, so a batch runs the vision tower only when it has images."""
    order = sorted(range(len(items)), key=lambda i: bool(items[i].image))
    return [np.asarray(order[s:s + self.batch_size]) for s in range(0, len(order),
                                                                    self.batch_size)]

  def _encode(self, items: Sequence[Item], mode: str, candidate: bool,
              out: np.ndarray | None = None) -> Encoded:
    if mode not in MODES:
      raise ValueError(f"mode={mode!r}; expected one of {MODES}")
    n, emb_id = len(items), self.tok.emb_id
    out = _output(out, n, self.model.cfg.text.width)
    generated: list[list[int]] = [[] for _ in range(n)]
    capped = np.zeros(n, bool)
    encs = [self._prompt(it, candidate) for it in items]
    seqs = [list(e.ids[:e.prompt_len]) for e in encs]
    pool = _Pool(self.batch_size, self.buckets[-1], self.max_new_tokens, self._decode_device)
    for rows in self._batches(items):
      batch = self._pack([seqs[i] for i in rows], [items[i] for i in rows])
      # The prefill caches the prompt only (writing it costs a few percent of the pass); the
      # pool adds the reasoning's slots.
      emb, logits, cache = self._run_prefill(
        batch, batch[1].sum(axis=1) - 1, max_len=0 if mode == "direct" else batch[0].shape[1])
      out[rows], logits = np.asarray(emb)[:len(rows)], np.array(logits)[:len(rows)]
      if mode == "direct":
        continue
      if mode == "always_reason":
        logits[:, emb_id] = -np.inf
      tokens = logits.argmax(-1)
      reasoning = np.flatnonzero(tokens != emb_id)  # The rest are done.
      while len(reasoning):  # Into the pool; decode once it is full.
        took = pool.put(cache, reasoning, rows[reasoning], tokens[reasoning])
        reasoning = reasoning[took:]
        if pool.full:
          self._decode(pool, out, generated, capped)
    if pool.rows:
      self._decode(pool, out, generated, capped)
    if self.readout != "pre_token":  # Once every row has its text (images are read again).
      for rows in self._batches(items):
        full = [seqs[i] + generated[i] + [emb_id] for i in rows]
        out[rows] = self._readout(full, [items[i] for i in rows])
    texts = [self.tok.decode(g) for g in generated]
    return Encoded(out, texts, np.asarray([len(g) > 0 for g in generated], bool), capped,
                   np.asarray([e.text_cut for e in encs], np.int64))

  def _decode(self, pool: "_Pool", out: np.ndarray, generated: list[list[int]],
              capped: np.ndarray):
    """Greedy decoding of the pool's rows until `<|emb|>` or `max_new_tokens`, `decode_chunk`
    steps per call, compacting the batch to the rows still reasoning between calls; writes each
    row's embedding into `out`, its tokens into `generated` and whether it hit the cap into
    `capped` (all indexed by item), and empties the pool."""
    emb_id = self.tok.emb_id
    cache, rows, tokens = pool.take()
    for r, t in zip(rows, tokens):
      generated[r].append(int(t))
    active = np.arange(len(rows))  # Pool rows still reasoning.
    held = np.arange(cache.valid_bs.shape[0])  # Which pool row each cache row holds.
    while len(active):
      # On one device, batches of 3 * 2^k rows too; split over a mesh, powers of two.
      one = _bucket(len(active)) <= self._one_device_rows
      size = _rows_bucket(len(active)) if one or self.mesh is None else _bucket(len(active))
      keep = _padded(active, size)
      if not np.array_equal(keep, held):
        cache, held = _take_rows(cache, held, keep), keep
      cache = self._place_cache(cache, one)
      counts = [len(generated[rows[s]]) for s in keep]
      with contextlib.nullcontext() if one else self._on_mesh():
        h, written, nxt, going, hit_cap, cache = _decode_chunk(
          *(self._decode_split if one else self._split), self._to_decode(tokens[keep], one),
          self._to_decode(counts, one), cache, emb_id, self.max_new_tokens,
          steps=self.decode_chunk)
      m = len(active)
      out[rows[active]] = np.asarray(h)[:m]  # Rows that wrote max_new_tokens keep their last state.
      capped[rows[active]] |= np.asarray(hit_cap)[:m]
      for s, new in zip(active, np.asarray(written)[:m]):
        generated[rows[s]] += [int(t) for t in new if t >= 0]
      tokens[active] = np.asarray(nxt)[:m]
      active = active[np.asarray(going)[:m]]


def _output(out: np.ndarray | None, n: int, width: int) -> np.ndarray:
  """`out` checked to hold [n, width] rows, or a new float32 array."""
  if out is None:
    return np.zeros((n, width), np.float32)
  if tuple(out.shape) != (n, width):
    raise ValueError(f"out has shape {tuple(out.shape)}; expected {(n, width)}")
  return out


class _Pool:
  """The caches of reasoning rows gathered across prefill batches until `capacity` rows wait, so
  they decode together: with few reasoning queries (4% on MSCOCO), a batch holds one or two, and a
  decoding step has a fixed cost that one or two rows would pay whole in every batch (dispatching
  a few hundred small operations on a CPU, reading every weight on an accelerator).

  One cache buffer of `capacity` rows and `prompt_slots + max_new` slots (a row's prompt first,
  invalid slots up to `prompt_slots`, then room for its reasoning), allocated at the first `put`
  and then updated in place; on the host, the item each filled row holds and its next token. With
  a `device` (the one-device decode's), the buffer lives there: moving a prefill batch's cache to
  it and copying rows there costs less than gathering rows across the mesh."""

  def __init__(self, capacity: int, prompt_slots: int, max_new: int,
               device: jax.Device | None = None):
    self.capacity, self.prompt_slots, self.max_new = capacity, prompt_slots, max_new
    self.device = device
    self.cache: KVCache | None = None
    self.rows: list[int] = []
    self.tokens: list[int] = []

  @property
  def full(self) -> bool:
    return len(self.rows) == self.capacity

  def put(self, cache: KVCache, batch_rows: np.ndarray, items: np.ndarray,
          tokens: np.ndarray) -> int:
    """Copies as many of `batch_rows` (rows of a prefill batch's `cache`, holding `items`) as
    fit; returns how many."""
    k = min(len(batch_rows), self.capacity - len(self.rows))
    if self.device is not None:
      cache = jax.device_put(cache, self.device)
    src = _padded(batch_rows[:k], _bucket(k))
    if self.cache is None:  # Placed like the first batch's cache; rows past `k` are free.
      self.cache = _new_pool(cache, jnp.asarray(_padded(src, self.capacity)),
                             prompt_slots=self.prompt_slots, max_new=self.max_new)
    else:
      dst = _padded(np.arange(len(self.rows), len(self.rows) + k), _bucket(k))
      self.cache = _scatter_rows(self.cache, cache, jnp.asarray(src), jnp.asarray(dst))
    self.rows += [int(i) for i in items[:k]]
    self.tokens += [int(t) for t in tokens[:k]]
    return k

  def take(self) -> tuple[KVCache, np.ndarray, np.ndarray]:
    """(cache, item of each filled row, its next token); the pool is empty again (its buffer is
    reused by the next `put`)."""
    out = self.cache, np.asarray(self.rows), np.asarray(self.tokens, np.int64)
    self.rows, self.tokens = [], []
    return out


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


def _padded(idx: np.ndarray, size: int) -> np.ndarray:
  """`idx` repeated at its first entry up to `size` (repeats copy the same row again)."""
  return np.concatenate([idx, np.repeat(idx[:1], size - len(idx))]).astype(np.int32)


def _take_rows(cache: KVCache, held: np.ndarray, wanted: np.ndarray) -> KVCache:
  """The cache restricted (and reordered) to rows `wanted`, given the rows it holds."""
  where = {int(r): i for i, r in enumerate(held)}
  return _gather_rows(cache, jnp.asarray([where[int(r)] for r in wanted], jnp.int32))


@jax.jit
def _gather_rows(cache: KVCache, idx: jax.Array) -> KVCache:
  return KVCache(cache.k_lbksh[:, idx], cache.v_lbksh[:, idx], cache.valid_bs[idx], cache.index,
                 cache.next_position_b[idx])


def _rows_to_slots(cache: KVCache, idx: jax.Array, prompt_slots: int, max_new: int):
  """Keys, values and validity of rows `idx` of a prefill cache, its prompt slots padded with
  invalid ones to `prompt_slots`, then `max_new` empty slots."""
  pad = ((0, 0), (0, 0), (0, 0), (0, prompt_slots + max_new - cache.valid_bs.shape[1]), (0, 0))
  return (jnp.pad(cache.k_lbksh[:, idx], pad), jnp.pad(cache.v_lbksh[:, idx], pad),
          jnp.pad(cache.valid_bs[idx], pad[2:4]))


@functools.partial(jax.jit, static_argnames=("prompt_slots", "max_new"))
def _new_pool(cache: KVCache, idx: jax.Array, prompt_slots: int, max_new: int) -> KVCache:
  """A pool buffer holding rows `idx` of a prefill cache; the next slot to write is the first
  after the prompts."""
  k, v, valid = _rows_to_slots(cache, idx, prompt_slots, max_new)
  return KVCache(k, v, valid, jnp.full((), prompt_slots, jnp.int32), cache.next_position_b[idx])


@functools.partial(jax.jit, donate_argnums=0)
def _scatter_rows(pool: KVCache, cache: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
  """`pool` (updated in place) with rows `dst` replaced by rows `src` of a prefill cache."""
  k, v, valid = _rows_to_slots(cache, src, pool.valid_bs.shape[1], 0)  # All the pool's slots.
  return KVCache(pool.k_lbksh.at[:, dst].set(k), pool.v_lbksh.at[:, dst].set(v),
                 pool.valid_bs.at[dst].set(valid), pool.index,
                 pool.next_position_b.at[dst].set(cache.next_position_b[src]))
