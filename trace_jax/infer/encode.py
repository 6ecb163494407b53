"""The implicit-routing encoder: candidates in one pass; queries prefill, then reason only if the
model chooses to (TRACE.md, "Inference: implicit routing").

`adaptive` (default): one batched prefill; rows whose greedy first token is `<|emb|>` take the
hidden state of the last prompt token (the pre-token) from that same pass. Only the other rows
decode, greedily, until `<|emb|>` or `max_new_tokens`, in the generation engine
(`trace_jax/generate/engine.py`, the project's one decode implementation): their prefill caches
go into the engine's slots, and when every slot is taken the engine decodes one chunk of
`decode_chunk` steps (one on-device loop) before the next prefill batch; rows that finished free
their slots for the reasoning rows of the following batches (continuous batching), the rest are
decoded at the end. With few reasoning queries (4% on MSCOCO: one or two per batch of 32),
decoding each batch's own would pay a whole greedy loop's fixed per-step cost per batch. The
engine keeps its decode batch to the rows still reasoning, and on a mesh where every device
holds the whole model, runs small decode batches on one device. `direct` forces `<|emb|>`
first; `always_reason` forbids it as the first token.

Prompts are cut where tokens are made (`data/prompts.py`): a query text longer than the encoder's
`query_text_tokens`, or one that does not fit the largest prompt bucket, loses its tail
(instruction, image tokens and rule stay whole); a candidate is cut by the candidate-length policy
training applies (`prompts.encode_candidate` under `cand_text_tokens` and `cand_len`, the config's
`data.cand_text_tokens` and `data.cand_len`), so it is embedded from the tokens it was trained on.
`Encoded.truncated` says by how many tokens. Items without an image are batched apart from those
with one and run no vision tower. Candidates are tokenised batch by batch, and `image_workers`
threads decode the next batch's images while the current one runs (so a pool is streamed through
in chunks, `eval/pools.py`). A reasoning row that writes `max_new_tokens` without reaching
`<|emb|>` is read at its last token, a position never trained as a readout: `Encoded.capped` marks
it. Errors name the item's `id`.

Readout: the pre-token (the paper's choice) comes from the passes above. The other readouts of
`loss.readout` (`emb`, `end_of_reasoning`) need states the routing passes do not compute, so
after routing and decoding one more forward pass runs over each row's prompt + generated text +
`<|emb|>` and reads the position the train step reads (`model.readout.readout_index`);
candidates then feed `<|emb|>` with their prompt. With `cand_reasoning` (the candidate-side
reasoning ablation) candidates use the reasoning candidate prompt and are encoded like adaptive
queries. Retrieval itself is in `retrieval.py`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
from concurrent import futures
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trace_jax.data import image as image_lib
from trace_jax.data import prompts
from trace_jax.data.tokenizer import Tokenizer
from trace_jax.generate import batching
from trace_jax.generate.engine import Engine
from trace_jax.generate.programs import prefill
from trace_jax.model.qwen_vl import QwenVL
from trace_jax.model.readout import READOUTS, readout_index

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


class Encoder:
  """Embeds queries and candidates with a trained model."""

  def __init__(self, model: QwenVL, tok: Tokenizer, *, image_grid: Sequence[int], root: str = "",
               batch_size: int = 32, prompt_buckets: Sequence[int] = (64, 128, 256),
               max_new_tokens: int = 96, compact_prompts: bool = False, decode_chunk: int = 16,
               mesh: jax.sharding.Mesh | None = None, readout: str = "pre_token",
               eor_id: int = -1, cand_reasoning: bool = False, query_text_tokens: int = 0,
               cand_text_tokens: int = 0, cand_len: int = 0, image_workers: int = 4):
    """The encoder keeps the model's weights as they are now (split once; build a new encoder
    after changing them). `mesh`: the model's mesh; each batch's rows are then split over its
    batch axes (the `act_batch` rule), so every device embeds its share instead of all repeating
    the batch. `readout`, `eor_id`: as the model was trained (`loss.readout`, the marker's id);
    `cand_reasoning`: candidates were trained to write text first (`data.cand_target`);
    `query_text_tokens`, `cand_text_tokens`: cut longer texts (0: only to fit the buckets);
    `cand_len`: the longest candidate sequence, `<|emb|>` included (`data.cand_len`, the
    candidate-length policy training cuts by; 0: what the largest bucket holds);
    `image_workers`: threads decoding the next candidate batch's images (0: in this thread)."""
    if readout not in READOUTS:
      raise ValueError(f"readout={readout!r}; expected one of {READOUTS}")
    if readout == "end_of_reasoning" and eor_id < 0:
      raise ValueError("readout='end_of_reasoning' needs the end-of-reasoning token id (eor_id)")
    if decode_chunk < 1:
      raise ValueError(f"decode_chunk={decode_chunk}; expected >= 1")
    self.readout, self.eor_id, self.cand_reasoning = readout, eor_id, cand_reasoning
    self.model, self.tok, self.root, self.mesh = model, tok, root, mesh
    self._split = nnx.split(model)
    self.grid = tuple(image_grid)
    self.batch_size, self.buckets = batch_size, tuple(sorted(prompt_buckets))
    self.max_new_tokens, self.compact = max_new_tokens, compact_prompts
    self.query_text_tokens = query_text_tokens
    self.cand_limits = _candidate_limits(cand_text_tokens, cand_len, self.buckets[-1], readout,
                                         cand_reasoning)
    self.decode_chunk, self.image_workers = decode_chunk, image_workers
    self._image_pool = None
    self.layout = batching.image_layout(model.cfg, self.grid)
    self.patches = int(np.prod(self.grid))
    self.image_tokens = self.patches // model.cfg.vision.spatial_merge_size**2
    # A row writes up to max_new_tokens tokens of reasoning and then <|emb|> (one token more):
    # the engine stops it at <|emb|> or after max_new_tokens + 1 tokens (then capped). On a
    # mesh where every device holds the whole model, a decode batch no larger than one device's
    # share of a prefill batch decodes on one device instead of splitting its few rows over all
    # of them (each step would wait on every device: 16 steps of one row of the demo model take
    # 4.6 ms on one CPU device, 11-25 ms on the 4-device mesh).
    self.engine = Engine(model, capacity=batch_size, cache_len=self.buckets[-1] + max_new_tokens,
                         max_new_tokens=max_new_tokens + 1, stop_ids=(tok.emb_id,),
                         chunk=decode_chunk, mesh=mesh,
                         one_device_rows=max(1, batch_size // mesh.size) if mesh else 0)

  def _on_mesh(self):
    return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

  def _pixels(self, it: Item) -> np.ndarray:
    full = it.image if not self.root else os.path.join(self.root, it.image)
    if not os.path.isfile(full):  # M-BEIR's rule: a missing image stops, naming the item.
      raise FileNotFoundError(f"{it.id or 'item'}: image not found: {full}")
    try:
      return image_lib.resize_to_grid(full, self.grid[1:])[0]
    except ValueError as e:
      raise ValueError(f"{it.id or 'item'}: {e}") from e

  def _prompt(self, it: Item, candidate: bool) -> prompts.Encoded:
    """The item's prompt: a candidate's by the candidate-length policy, a query's text cut to
    the encoder's limit and to fit the largest bucket (its prefill excludes its target
    `<|emb|>`, hence the one token more)."""
    n_img = self.image_tokens if it.image else 0
    try:
      if candidate:
        enc = prompts.encode_candidate(self.tok, it.text, n_img, self.compact,
                                       may_reason=self.cand_reasoning, limits=self.cand_limits)
        if enc.prompt_len > self.buckets[-1]:  # Only under candidate-side reasoning.
          raise prompts.PromptTooLongError(f"a prompt of {enc.prompt_len} tokens (data.cand_len="
                                           f"{self.cand_limits.max_len}), more than the largest "
                                           f"bucket {self.buckets[-1]}")
        return enc
      return prompts.encode_query(self.tok, it.text or "", n_img, None, self.compact,
                                  max_text_tokens=self.query_text_tokens,
                                  max_len=self.buckets[-1] + 1)
    except prompts.PromptTooLongError as e:
      raise ValueError(f"{it.id or 'item'}: {e} (eval.prompt_buckets)") from None

  def _pack(self, seqs: Sequence[Sequence[int]], items: Sequence[Item],
            grow: bool = False, images: Sequence[np.ndarray | None] | None = None
            ) -> batching.Packed:
    """A `batch_size` batch of the sequences and their items' images (decoded here unless
    given); `grow`: sequences longer than every bucket (prompts with their generated text) take
    the next power of two."""
    if images is None:
      images = [self._pixels(it) if it.image else None for it in items]
    return batching.pack(seqs, images, self.model.cfg, self.grid, self.batch_size, self.buckets,
                         grow)

  def _prefill(self, packed: batching.Packed, read, max_len: int = 0):
    """(unit hidden states at `read`, next-token logits, cache) of a packed batch."""
    with self._on_mesh():
      return prefill(*self._split, *batching.on_devices(packed, self.mesh),
                     None if packed.pixels is None else self.layout, jnp.asarray(read),
                     max_len=max_len, unit=True)

  def _read(self, packed: batching.Packed, read: Sequence[int]) -> np.ndarray:
    """Unit hidden states [n, D] at positions `read` (one per real row): one forward pass."""
    n = len(read)
    emb, _, _ = self._prefill(packed, np.pad(np.asarray(read, np.int32),
                                             (0, packed.ids.shape[0] - n)))
    return np.asarray(emb)[:n]

  def _readout(self, seqs, items) -> np.ndarray:
    """Embeddings of full sequences (prompt, generated text, `<|emb|>`) at the trained readout."""
    packed = self._pack(seqs, items, grow=True)
    read = readout_index(jnp.asarray(packed.ids), self.readout, self.tok.emb_id, self.eor_id)
    return self._read(packed, np.asarray(read)[:len(seqs)])

  def encode_candidates(self, items: Sequence[Item], out: np.ndarray | None = None) -> Encoded:
    """Embeddings [N, D] (written into `out` when given, e.g. a memmap): one forward pass per
    batch (with `cand_reasoning`, the adaptive query path with the candidate prompt)."""
    if self.cand_reasoning:
      return self._encode(items, "adaptive", candidate=True, out=out)
    n = len(items)
    out = _output(out, n, self.model.cfg.text.width)
    cut = np.zeros(n, np.int64)
    for rows, images in self._with_images(items, self._batches(items)):
      encs = [self._prompt(items[i], True) for i in rows]  # Tokenised as each batch comes.
      cut[rows] = [e.text_cut for e in encs]
      seqs = [list(e.ids[:e.prompt_len]) for e in encs]
      if self.readout == "emb":  # The other readouts read the last prompt token here.
        seqs = [s + [self.tok.emb_id] for s in seqs]
      out[rows] = self._read(self._pack(seqs, [items[i] for i in rows], images=images),
                             [len(s) - 1 for s in seqs])
    return Encoded(out, [""] * n, np.zeros(n, bool), np.zeros(n, bool), cut)

  def _with_images(self, items: Sequence[Item], batches: Sequence[np.ndarray]):
    """Yields (rows, their decoded images) per batch, in order; worker threads decode the next
    batch's images while the caller runs this one (one batch ahead, so at most two batches of
    pixels exist). A missing or bad image raises here, naming its item."""
    if not self.image_workers:
      for rows in batches:
        yield rows, [self._pixels(items[i]) if items[i].image else None for i in rows]
      return
    if self._image_pool is None:  # One pool for the encoder's life (no thread churn).
      self._image_pool = futures.ThreadPoolExecutor(self.image_workers, "encoder-images")
    ahead = collections.deque()
    try:
      for rows in list(batches) + [None]:
        if rows is not None:
          ahead.append((rows, [self._image_pool.submit(self._pixels, items[i])
                               if items[i].image else None for i in rows]))
        if len(ahead) > 1 or (rows is None and ahead):
          done, jobs = ahead.popleft()
          yield done, [None if j is None else j.result() for j in jobs]
    finally:  # Stopped early (an error): the batch decoded ahead is dropped.
      for _, jobs in ahead:
        for j in jobs:
          if j is not None:
            j.cancel()

  def encode_queries(self, items: Sequence[Item], mode: str = "adaptive",
                     out: np.ndarray | None = None) -> Encoded:
    return self._encode(items, mode, candidate=False, out=out)

  def _batches(self, items: Sequence[Item]) -> list[np.ndarray]:
    """Item indices in batches of at most `batch_size`: items without an image first, then those
    with one, so a batch runs the vision tower only when it has images; within each, shortest text
    first, so that a batch's rows take one bucket (a Wikipedia passage does not pad 31 captions
    to its length)."""
    order = sorted(range(len(items)), key=lambda i: (bool(items[i].image),
                                                     len(items[i].text or "")))
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
    finished = []
    for rows in self._batches(items):
      packed = self._pack([seqs[i] for i in rows], [items[i] for i in rows])
      # The prefill caches the prompt only (writing it costs a few percent of the pass); the
      # engine's slots add the reasoning's.
      emb, logits, cache = self._prefill(packed, packed.lengths - 1,
                                         max_len=0 if mode == "direct" else packed.ids.shape[1])
      out[rows], logits = np.asarray(emb)[:len(rows)], np.array(logits)[:len(rows)]
      if mode == "direct":
        continue
      if mode == "always_reason":
        logits[:, emb_id] = -np.inf
      tokens = logits.argmax(-1)
      reasoning = np.flatnonzero(tokens != emb_id)  # The rest are done.
      while len(reasoning):  # Into free slots; decode a chunk when none is left.
        took = self.engine.submit(cache, reasoning, packed.lengths[reasoning], tokens[reasoning],
                                  np.zeros(len(reasoning), np.int32), rows[reasoning])
        reasoning = reasoning[took:]
        if not self.engine.free:
          finished += self.engine.step(shrink=False)  # More rows come with the next batch.
    for f in finished + self.engine.drain():
      # The engine's last token is <|emb|>, or one past max_new_tokens for a capped row.
      generated[f.tag], capped[f.tag] = f.tokens[:-1], f.capped
      out[f.tag] = f.hidden / max(float(np.linalg.norm(f.hidden)), 1e-12)
    self.engine.release()  # A call's programs then depend on its own items only.
    if self.readout != "pre_token":  # Once every row has its text (images are read again).
      for rows in self._batches(items):
        full = [seqs[i] + generated[i] + [emb_id] for i in rows]
        out[rows] = self._readout(full, [items[i] for i in rows])
    texts = [self.tok.decode(g) for g in generated]
    return Encoded(out, texts, np.asarray([len(g) > 0 for g in generated], bool), capped,
                   np.asarray([e.text_cut for e in encs], np.int64))


def _candidate_limits(text_tokens: int, cand_len: int, largest: int, readout: str,
                      cand_reasoning: bool) -> prompts.CandidateLimits:
  """The candidate-length policy of an encoder whose largest prompt bucket is `largest`. The
  sequence a candidate feeds is its prompt, with `<|emb|>` after it under the `emb` readout;
  `cand_len` (0: what that bucket holds) must fit, unless candidates reason (`cand_len` then
  bounds prompt + reasoning in training, and each prompt is checked)."""
  holds = largest + (0 if readout == "emb" else 1)  # The longest sequence, <|emb|> included.
  if cand_len > holds and not cand_reasoning:
    raise ValueError(f"data.cand_len={cand_len}: the largest of eval.prompt_buckets ({largest}) "
                     f"holds candidates of at most {holds} tokens; raise it so that candidates "
                     "are embedded from the tokens they were trained on")
  return prompts.CandidateLimits(text_tokens, cand_len or holds)


def _output(out: np.ndarray | None, n: int, width: int) -> np.ndarray:
  """`out` checked to hold [n, width] rows, or a new float32 array."""
  if out is None:
    return np.zeros((n, width), np.float32)
  if tuple(out.shape) != (n, width):
    raise ValueError(f"out has shape {tuple(out.shape)}; expected {(n, width)}")
  return out
