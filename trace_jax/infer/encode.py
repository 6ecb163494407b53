"""The implicit-routing encoder: candidates in one pass; queries prefill, then reason only if the
model chooses to (TRACE.md, "Inference: implicit routing").

`adaptive` (default): one batched prefill; rows whose greedy first token is `<|emb|>` take the
hidden state of the last prompt token (the pre-token) from that same pass. Only the other rows
decode greedily with the KV cache until `<|emb|>` or `max_new_tokens`: `decode_chunk` steps run as
one on-device loop (no host round trip per token; it ends early once every row has stopped), and
between chunks the decode batch is compacted to the rows still reasoning (padded to a power of
two, so few programs compile); a finished row rides along at most to its chunk's end. The
prefill caches the prompt only; the cache grows by `max_new_tokens` slots when a row reasons.
With a `mesh`, every batch's rows are split over the devices. `direct` forces `<|emb|>` first;
`always_reason` forbids it as the first token.

Readout: the pre-token (the paper's choice) comes from the passes above. The other readouts of
`loss.readout` (`emb`, `end_of_reasoning`) need states the routing passes do not compute, so
after routing and decoding one more forward pass runs over each row's prompt + generated text +
`<|emb|>` and reads the position the train step reads (`train.step.readout_index`); candidates
then feed `<|emb|>` with their prompt. With `cand_reasoning` (the candidate-side reasoning
ablation) candidates use the reasoning candidate prompt and are encoded like adaptive queries.
Retrieval itself is in `retrieval.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
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
from trace_jax.train.step import READOUTS, readout_index

MODES = ("adaptive", "direct", "always_reason")


@dataclasses.dataclass(frozen=True)
class Item:
  """A query or candidate to embed: its text (instruction included) and image path, if any."""

  text: str | None
  image: str | None  # Absolute path or path under the encoder's root.


@dataclasses.dataclass(frozen=True)
class Encoded:
  embeddings: np.ndarray  # [N, D] L2-normalised float32.
  texts: list[str]  # The generated reasoning ("" when the row embedded at once).
  reasoned: np.ndarray  # [N] bool: the row wrote at least one token before <|emb|>.


def _unit(x):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


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
  return _unit(h), model.logits(h), out.cache


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"))
def _decode_chunk(graphdef, state, tokens, counts, cache, emb_id, max_new, steps: int):
  """Up to `steps` greedy steps in one program, for rows that all reason on entry.

  tokens [B]: each row's latest token, not yet fed; counts [B]: tokens it has written. A row
  stops at `<|emb|>` or `max_new` tokens; the loop ends early once every row has stopped.
  Returns (the unit hidden state of each row's last fed token, the tokens written [B, steps]
  (-1 after the row stopped), next tokens, still reasoning [B], cache).
  """
  model = nnx.merge(graphdef, state)
  b = tokens.shape[0]

  def body(c):
    i, tokens, counts, active, h_out, written, cache = c
    out = model.decode(tokens[:, None], cache)
    h = out.hidden_states[:, 0]
    nxt = jnp.argmax(model.logits(h), axis=-1).astype(tokens.dtype)
    h_out = jnp.where(active[:, None], _unit(h), h_out)  # The pre-token once <|emb|> is next.
    going = active & (nxt != emb_id) & (counts < max_new)
    written = written.at[:, i].set(jnp.where(going, nxt, -1))
    return (i + 1, jnp.where(going, nxt, tokens), counts + going, going, h_out, written,
            out.cache)

  init = (jnp.zeros((), jnp.int32), tokens, counts, jnp.ones((b,), bool),
          jnp.zeros((b, model.cfg.text.width), jnp.float32), jnp.full((b, steps), -1, jnp.int32),
          cache)
  _, tokens, _, active, h_out, written, cache = jax.lax.while_loop(
    lambda c: (c[0] < steps) & jnp.any(c[3]), body, init)
  return h_out, written, tokens, active, cache


def _bucket(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


class Encoder:
  """Embeds queries and candidates with a trained model."""

  def __init__(self, model: QwenVL, tok: Tokenizer, *, image_grid: Sequence[int], root: str = "",
               batch_size: int = 32, prompt_buckets: Sequence[int] = (64, 128, 256),
               max_new_tokens: int = 96, compact_prompts: bool = False, decode_chunk: int = 16,
               mesh: jax.sharding.Mesh | None = None, readout: str = "pre_token",
               eor_id: int = -1, cand_reasoning: bool = False):
    """The encoder keeps the model's weights as they are now (split once; build a new encoder
    after changing them). `mesh`: the model's mesh; each batch's rows are then split over its
    batch axes (the `act_batch` rule), so every device embeds its share instead of all repeating
    the batch. `readout`, `eor_id`: as the model was trained (`loss.readout`, the marker's id);
    `cand_reasoning`: candidates were trained to write text first (`data.cand_target`)."""
    if readout not in READOUTS:
      raise ValueError(f"readout={readout!r}; expected one of {READOUTS}")
    if readout == "end_of_reasoning" and eor_id < 0:
      raise ValueError("readout='end_of_reasoning' needs the end-of-reasoning token id (eor_id)")
    self.readout, self.eor_id, self.cand_reasoning = readout, eor_id, cand_reasoning
    self.model, self.tok, self.root, self.mesh = model, tok, root, mesh
    self._split = nnx.split(model)
    self.grid = tuple(image_grid)
    self.batch_size, self.buckets = batch_size, tuple(sorted(prompt_buckets))
    self.max_new_tokens, self.compact = max_new_tokens, compact_prompts
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

  def _put(self, ids, mask, positions, pixels):
    """The host batch on the devices: rows split over the mesh's batch axes (when there is one)."""
    if self.mesh is None:
      return ids, mask, positions, pixels
    put = functools.partial(sharding.put, mesh=self.mesh)
    return (put(ids, names=("act_batch", None)), put(mask, names=("act_batch", None)),
            put(positions, names=(None, "act_batch", None)),
            put(pixels, names=("act_batch", None, None)))

  def _pixels(self, path):
    if path is None:
      return np.zeros((self.patches, self.model.cfg.vision.patch_dim), np.float32)
    full = path if not self.root else f"{self.root}/{path}"
    return image_lib.resize_to_grid(full, self.grid[1:])[0]

  def _prompt(self, it: Item, candidate: bool) -> list[int]:
    n_img = self.image_tokens if it.image else 0
    enc = (prompts.encode_candidate(self.tok, it.text, n_img, self.compact,
                                    may_reason=self.cand_reasoning) if candidate else
           prompts.encode_query(self.tok, it.text or "", n_img, None, self.compact))
    return list(enc.ids[:enc.prompt_len])

  def _pack(self, seqs: Sequence[Sequence[int]], items: Sequence[Item], pixels=None,
            grow: bool = False):
    """Right-padded ids, mask, positions and pixels (computed unless given) of up to
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
    if pixels is None:
      pixels = np.zeros((b, self.patches, self.model.cfg.vision.patch_dim), np.float32)
      for i, it in enumerate(items):
        pixels[i] = self._pixels(it.image)
    return ids, mask, positions, pixels

  def _read(self, batch, read: Sequence[int]) -> np.ndarray:
    """Unit hidden states [n, D] at positions `read` (one per item) of a packed batch: one
    forward pass (inside the mesh context)."""
    n = len(read)
    read = np.pad(np.asarray(read, np.int32), (0, batch[0].shape[0] - n))
    emb, _, _ = _prefill(*self._split, *self._put(*batch), self.layout, jnp.asarray(read),
                         max_len=0)
    return np.asarray(emb)[:n]

  def _readout(self, seqs, items, pixels) -> np.ndarray:
    """Embeddings of full sequences (prompt, generated text, `<|emb|>`) at the trained readout."""
    batch = self._pack(seqs, items, pixels, grow=True)
    read = readout_index(jnp.asarray(batch[0]), self.readout, self.tok.emb_id, self.eor_id)
    return self._read(batch, np.asarray(read)[:len(seqs)])

  def encode_candidates(self, items: Sequence[Item]) -> np.ndarray:
    """[N, D] embeddings: one forward pass per batch (with `cand_reasoning`, the adaptive
    query path with the candidate prompt)."""
    if self.cand_reasoning:
      return self._encode(items, "adaptive", candidate=True).embeddings
    out = []
    for start in range(0, len(items), self.batch_size):
      chunk = items[start:start + self.batch_size]
      seqs = [self._prompt(it, True) for it in chunk]
      if self.readout == "emb":  # The other readouts read the last prompt token here.
        seqs = [s + [self.tok.emb_id] for s in seqs]
      with self._on_mesh():
        out.append(self._read(self._pack(seqs, chunk), [len(s) - 1 for s in seqs]))
    return np.concatenate(out)

  def encode_queries(self, items: Sequence[Item], mode: str = "adaptive") -> Encoded:
    return self._encode(items, mode, candidate=False)

  def _encode(self, items: Sequence[Item], mode: str, candidate: bool) -> Encoded:
    if mode not in MODES:
      raise ValueError(f"mode={mode!r}; expected one of {MODES}")
    embs, texts, reasoned = [], [], []
    for start in range(0, len(items), self.batch_size):
      chunk = items[start:start + self.batch_size]
      with self._on_mesh():
        e, t, r = self._encode_batch(chunk, mode, candidate)
      embs.append(e)
      texts += t
      reasoned.append(r)
    return Encoded(np.concatenate(embs), texts, np.concatenate(reasoned))

  def _encode_batch(self, items, mode, candidate):
    n, emb_id = len(items), self.tok.emb_id
    seqs = [self._prompt(it, candidate) for it in items]
    ids, mask, positions, pixels = self._pack(seqs, items)
    # The prefill caches the prompt only (writing it costs a few percent of the pass); the cache
    # grows when some row goes on to reason. Prefilling the reasoning rows again instead would cost
    # more as soon as most batches hold one reasoning query (4% of queries, batch 32).
    max_len = 0 if mode == "direct" else ids.shape[1]
    last = jnp.asarray(mask.sum(axis=1) - 1)
    emb, logits, cache = _prefill(*self._split, *self._put(ids, mask, positions, pixels),
                                  self.layout, last, max_len=max_len)
    out, logits = np.array(emb)[:n], np.array(logits)[:n]
    generated: list[list[int]] = [[] for _ in range(n)]
    if mode == "always_reason":
      logits[:, emb_id] = -np.inf
    tokens = logits.argmax(-1)
    active = (np.flatnonzero(tokens != emb_id) if mode != "direct"
              else np.zeros(0, int))  # Rows that reason; the rest are done.
    for row in active:
      generated[row].append(int(tokens[row]))
    held = np.arange(ids.shape[0])  # Which original row each cache row holds.
    extra = self.max_new_tokens  # Slots for the reasoning, added to the first compacted cache.
    while len(active):
      keep = np.concatenate([active, np.repeat(active[:1], _bucket(len(active)) - len(active))])
      if extra or not np.array_equal(keep, held):
        cache, held, extra = _take_rows(cache, held, keep, extra), keep, 0
      counts = np.asarray([len(generated[r]) for r in keep], np.int32)
      h, written, nxt, going, cache = _decode_chunk(
        *self._split, jnp.asarray(tokens[keep], jnp.int32), jnp.asarray(counts), cache, emb_id,
        self.max_new_tokens, steps=self.decode_chunk)
      m = len(active)
      out[active] = np.asarray(h)[:m]  # Rows that wrote max_new_tokens keep their last state.
      for row, new in zip(active, np.asarray(written)[:m]):
        generated[row] += [int(t) for t in new if t >= 0]
      tokens[active] = np.asarray(nxt)[:m]
      active = active[np.asarray(going)[:m]]
    if self.readout != "pre_token":
      out = self._readout([s + g + [emb_id] for s, g in zip(seqs, generated)], items, pixels)
    texts = [self.tok.decode(g) for g in generated]
    return out, texts, np.asarray([len(g) > 0 for g in generated])


def _take_rows(cache: KVCache, held: np.ndarray, wanted: np.ndarray, extra: int = 0) -> KVCache:
  """The cache restricted (and reordered) to original rows `wanted`, given the rows it holds, with
  `extra` empty slots appended."""
  where = {int(r): i for i, r in enumerate(held)}
  return _gather_rows(cache, jnp.asarray([where[int(r)] for r in wanted], jnp.int32), extra)


@functools.partial(jax.jit, static_argnames="extra")
def _gather_rows(cache: KVCache, idx: jax.Array, extra: int) -> KVCache:
  pad = [(0, 0)] * cache.k_lbskh.ndim
  pad[2] = (0, extra)
  return KVCache(jnp.pad(cache.k_lbskh[:, idx], pad), jnp.pad(cache.v_lbskh[:, idx], pad),
                 jnp.pad(cache.valid_bs[idx], ((0, 0), (0, extra))), cache.index,
                 cache.next_position_b[idx])
