"""The batched, compacted routing encoder equals a naive one-query-at-a-time loop."""

import jax
import numpy as np
import pytest
from flax import nnx

from tests.data import pipeline_fixture as fx
from tests.model import tiny
from trace_jax import sharding
from trace_jax.data import prompts
from trace_jax.infer.encode import Encoder, Item
from trace_jax.model import QwenVL
from trace_jax.data.image import resize_to_grid
from trace_jax.model.positions import rope_index, vision_layout

GRID = (1, 4, 4)


class EmbAs:
  """The fixture tokenizer with `<|emb|>` mapped to a chosen id (to steer routing in tests)."""

  def __init__(self, tok, emb_id):
    self._tok, self.emb_id = tok, emb_id

  def __getattr__(self, name):
    return getattr(self._tok, name)


_NAIVE = {}


def naive(model, tok, item, max_new, mode, readout="pre_token", eor=-1, candidate=None,
          max_text_tokens=0):
  """Full forward passes, no cache: the reference for the encoder. Returns (embedding, token ids
  written before <|emb|>); `naive.capped` says whether the last call stopped at `max_new` with a
  next token other than <|emb|>. `candidate`: None for a query, else the candidate prompt's
  `may_reason`. Each reference is computed once per module (eager passes, token by token: the
  same queries recur across the parametrised tests); the model is kept with its entry, so its
  id is not reused."""
  key = (id(model), tok.emb_id, item, max_new, mode, readout, eor, candidate, max_text_tokens)
  if key not in _NAIVE:
    emb, written = _naive(model, tok, item, max_new, mode, readout, eor, candidate,
                          max_text_tokens)
    _NAIVE[key] = (model, emb, written, naive.capped)
  _, emb, written, naive.capped = _NAIVE[key]
  return emb.copy(), list(written)


def _naive(model, tok, item, max_new, mode, readout, eor, candidate, max_text_tokens):
  n_img = 4 if item.image else 0
  if candidate is None:
    enc = prompts.encode_query(tok, item.text, n_img, None, True, max_text_tokens=max_text_tokens)
  else:
    enc = prompts.encode_candidate(tok, item.text, n_img, True, may_reason=candidate)
  ids = list(enc.ids[:enc.prompt_len])
  pixels = None
  layout = None
  if item.image:
    pixels = resize_to_grid(f"{fx.ROOT}/{item.image}", GRID[1:])[0][None]
    layout = vision_layout(np.asarray([GRID]), model.cfg.vision, windowed=True)

  def hidden(ids):
    arr = np.asarray([ids], np.int32)
    pos = rope_index(arr, None, np.asarray([GRID]) if item.image else None, model.cfg)
    out = model(arr, None, pixels, position_ids=pos, vision_layout=layout)
    return np.asarray(out.hidden_states)[0], np.asarray(out.logits)[0, -1].copy()

  written = []
  naive.capped = False
  for step in range(max_new + 1):
    h, logits = hidden(ids)
    h = h[-1]
    if mode == "direct":
      break
    if mode == "always_reason" and step == 0:
      logits[tok.emb_id] = -np.inf
    nxt = int(logits.argmax())
    if nxt == tok.emb_id or len(written) == max_new:
      naive.capped = nxt != tok.emb_id
      break
    ids.append(nxt)
    written.append(nxt)
  if readout != "pre_token":  # Read the whole sequence with <|emb|> at the trained position.
    states, _ = hidden(ids + [tok.emb_id])
    pos = len(ids) if readout == "emb" else len(ids) - 1
    if readout == "end_of_reasoning" and eor in ids[enc.prompt_len:]:
      pos = len(ids) - 1 - ids[::-1].index(eor)
    h = states[pos]
  return h / np.linalg.norm(h), written


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  base = fx.tokenizer(str(tmp_path_factory.mktemp("sp")))
  model = tiny.perturb(QwenVL(fx.model_config(base), rngs=nnx.Rngs(0)))
  items = [Item(e.query_text, e.query_image) for e in fx.examples(6)]
  # Steer routing: let <|emb|> be the token the model writes first for item 0, so that some rows
  # embed at once and the others reason.
  _, first = naive(model, EmbAs(base, -1), items[0], 1, "always_reason")
  return model, EmbAs(base, first[0]), items


# decode_chunk 2: rows that stop mid-chunk ride along, and the batch shrinks between chunks.
# On a mesh, each batch's rows are split over the 8 test devices. `order` (batch 2, buckets
# (55, 64); the prompts have 51-58 tokens, and items 2, 3, 4 reason): reasoning rows of different
# prefill batches decode together, a 55-slot cache entering the engine beside a 64-slot one.
@pytest.mark.parametrize("mode,chunk,on_mesh,order", [
  ("adaptive", 16, False, None), ("adaptive", 2, False, None), ("direct", 16, False, None),
  ("always_reason", 16, False, None), ("always_reason", 2, False, None),
  ("adaptive", 2, True, None), ("always_reason", 16, True, None),
  ("adaptive", 2, False, (4, 0, 2, 1, 3, 5)), ("adaptive", 16, False, (2, 1, 4, 0, 3, 5))])
def test_batched_encoder_equals_naive_loop(setup, mode, chunk, on_mesh, order):
  model, tok, items = setup
  mesh = sharding.make_mesh(data=8, fsdp=1) if on_mesh else None
  if order is not None:
    items = [items[i] for i in order]
  enc = Encoder(model, tok, image_grid=GRID, root=fx.ROOT, batch_size=2 if order else 8,
                prompt_buckets=(55, 64) if order else (256,), max_new_tokens=5,
                compact_prompts=True, decode_chunk=chunk, mesh=mesh)
  got = enc.encode_queries(items, mode)
  for i, it in enumerate(items):
    want_emb, written = naive(model, tok, it, 5, mode)
    np.testing.assert_allclose(got.embeddings[i], want_emb, atol=2e-5, err_msg=str(i))
    assert got.texts[i] == tok.decode(written)
    assert got.reasoned[i] == bool(written)
    assert got.capped[i] == naive.capped, i
  assert not got.truncated.any()
  if mode == "adaptive":  # A mix: some rows embed at once.
    assert not got.reasoned.all() and got.reasoned.any()


def test_decode_chunk_must_be_positive(setup):
  model, tok, _ = setup
  with pytest.raises(ValueError, match="decode_chunk"):
    Encoder(model, tok, image_grid=GRID, decode_chunk=0)


@pytest.mark.parametrize("readout,mode", [("emb", "adaptive"), ("emb", "direct"),
                                          ("end_of_reasoning", "adaptive")])
def test_readouts_equal_naive_loop(setup, readout, mode):
  model, tok, items = setup
  # The end-of-reasoning "marker": the first token of a row that writes several (so it is not
  # the pre-token); rows that embed at once have none and fall back to the pre-token.
  eor = next(w[0] for w in (naive(model, tok, it, 5, "adaptive")[1] for it in items)
             if len(w) > 1)
  enc = Encoder(model, tok, image_grid=GRID, root=fx.ROOT, batch_size=8, prompt_buckets=(256,),
                max_new_tokens=5, compact_prompts=True, decode_chunk=2, readout=readout,
                eor_id=eor)
  got = enc.encode_queries(items, mode)
  for i, it in enumerate(items):
    want, written = naive(model, tok, it, 5, mode, readout, eor)
    np.testing.assert_allclose(got.embeddings[i], want, atol=2e-5, err_msg=str(i))
    assert got.texts[i] == tok.decode(written)
  pre = Encoder(model, tok, image_grid=GRID, root=fx.ROOT, batch_size=8, prompt_buckets=(256,),
                max_new_tokens=5, compact_prompts=True).encode_queries(items, mode)
  assert not np.allclose(pre.embeddings, got.embeddings, atol=1e-3)  # The readout matters.


@pytest.mark.parametrize("readout,cand_reasoning", [("pre_token", False), ("emb", False),
                                                    ("pre_token", True)])
def test_candidates_equal_naive_loop(setup, readout, cand_reasoning):
  model, tok, items = setup
  cands = [Item(e.cand_text, e.cand_image) for e in fx.examples(6)]
  enc = Encoder(model, tok, image_grid=GRID, root=fx.ROOT, batch_size=4, prompt_buckets=(256,),
                max_new_tokens=5, compact_prompts=True, readout=readout,
                cand_reasoning=cand_reasoning)
  got = enc.encode_candidates(cands)
  reasoned = 0
  for i, it in enumerate(cands):
    mode = "adaptive" if cand_reasoning else "direct"
    want, written = naive(model, tok, it, 5, mode, readout, candidate=cand_reasoning)
    np.testing.assert_allclose(got.embeddings[i], want, atol=2e-5, err_msg=str(i))
    reasoned += bool(written)
  assert (reasoned > 0) == cand_reasoning  # Candidates write text only when trained to.


def test_long_and_short_candidates_batch_apart(setup):
  """Candidates are batched shortest text first (the order given is kept in the output): four
  long texts interleaved with four short ones make one short batch and one long one, not two
  batches padded to the long bucket."""
  model, tok, _ = setup
  widths = []

  class Recording(Encoder):
    def _pack(self, *args, **kwargs):
      packed = super()._pack(*args, **kwargs)
      widths.append(packed.ids.shape[1])
      return packed

  cands = [Item(f"item {i} " + "red circle left " * (20 if i % 2 else 0), None, f"9:{i}")
           for i in range(8)]
  kw = dict(image_grid=GRID, root=fx.ROOT, prompt_buckets=(64, 256), compact_prompts=True)
  got = Recording(model, tok, batch_size=4, **kw).encode_candidates(cands)
  assert widths == [64, 256]
  alone = Encoder(model, tok, batch_size=1, **kw)
  for i, it in enumerate(cands):
    np.testing.assert_allclose(got.embeddings[i], alone.encode_candidates([it]).embeddings[0],
                               atol=2e-5, err_msg=str(i))


def test_end_of_reasoning_needs_the_marker_id(setup):
  model, tok, _ = setup
  with pytest.raises(ValueError, match="eor_id"):
    Encoder(model, tok, image_grid=GRID, readout="end_of_reasoning")


@pytest.mark.parametrize("fsdp", [1, 4])
def test_model_on_the_mesh_equals_naive_loop(setup, fsdp):
  """The model's weights placed on an 8-device mesh: replicated (fsdp 1: a decode batch of at
  most one row per device's prefill share decodes on one device) or sharded over fsdp (decoding
  stays on the mesh). Ten reasoning rows in batches of 8: the engine's slots fill, a chunk
  decodes split over the mesh, the last two take freed slots; one row alone decodes on one
  device when the model is replicated."""
  model, tok, items = setup
  mesh = sharding.make_mesh(data=8 // fsdp, fsdp=fsdp)
  placed = nnx.clone(model)
  state = nnx.state(placed)
  nnx.update(placed, jax.device_put(state, sharding.state_shardings(state, mesh)))
  enc = Encoder(placed, tok, image_grid=GRID, root=fx.ROOT, batch_size=8, prompt_buckets=(256,),
                max_new_tokens=5, compact_prompts=True, decode_chunk=2, mesh=mesh)
  assert (enc.engine._device is not None) == (fsdp == 1)  # pylint: disable=protected-access
  for batch in (items + items[:4], items[1:2]):
    got = enc.encode_queries(batch, "always_reason")
    for i, it in enumerate(batch):
      want_emb, written = naive(model, tok, it, 5, "always_reason")
      np.testing.assert_allclose(got.embeddings[i], want_emb, atol=2e-5, err_msg=str(i))
      assert got.texts[i] == tok.decode(written)


def test_capped_rows_are_marked(setup):
  """With a cap of 2 tokens some reasoning rows stop before <|emb|>: exactly those are capped."""
  model, tok, items = setup
  enc = Encoder(model, tok, image_grid=GRID, root=fx.ROOT, batch_size=8, prompt_buckets=(256,),
                max_new_tokens=2, compact_prompts=True, decode_chunk=1)
  got = enc.encode_queries(items, "always_reason")
  want = []
  for it in items:
    naive(model, tok, it, 2, "always_reason")
    want.append(naive.capped)
  assert got.capped.tolist() == want and any(want)


def test_long_texts_are_cut_and_counted(setup):
  model, tok, items = setup
  long = Item("Find the target. " + "red circle left " * 80, items[1].image, "9:77")
  enc = Encoder(model, tok, image_grid=GRID, root=fx.ROOT, batch_size=8, prompt_buckets=(256,),
                max_new_tokens=3, compact_prompts=True, query_text_tokens=30)
  got = enc.encode_queries([items[0], long], "adaptive")
  assert got.truncated.tolist() == [0, len(tok.encode(long.text)) - 30]
  want, _ = naive(model, tok, long, 3, "adaptive", max_text_tokens=30)
  np.testing.assert_allclose(got.embeddings[1], want, atol=2e-5)
  # Cut to fit the largest bucket when no limit is set.
  fit = Encoder(model, tok, image_grid=GRID, root=fx.ROOT, batch_size=8, prompt_buckets=(64,),
                max_new_tokens=3, compact_prompts=True).encode_candidates([long])
  assert fit.truncated[0] > 0


def test_errors_name_the_item(setup, tmp_path):
  model, tok, _ = setup

  def encoder(bucket):
    return Encoder(model, tok, image_grid=GRID, root=str(tmp_path), batch_size=8,
                   prompt_buckets=(bucket,), compact_prompts=True)
  with pytest.raises(FileNotFoundError, match=r"9:5: image not found: .*missing\.jpg"):
    encoder(256).encode_queries([Item("Find it.", "missing.jpg", "9:5")])
  with pytest.raises(FileNotFoundError, match=r"9:7: image not found"):  # Decoded by a worker.
    encoder(256).encode_candidates([Item("a", None, "9:1"), Item("b", "missing.jpg", "9:7")])
  with pytest.raises(ValueError, match=r"9:6: .* without any of its text.*eval\.prompt_buckets"):
    encoder(16).encode_queries([Item("Find it.", None, "9:6")], "direct")


def test_out_array_receives_the_embeddings(setup, tmp_path):
  """Embeddings streamed into a caller's array (a memmap for pools larger than memory)."""
  model, tok, items = setup
  enc = Encoder(model, tok, image_grid=GRID, root=fx.ROOT, batch_size=4, prompt_buckets=(256,),
                compact_prompts=True)
  cands = [Item(e.cand_text, e.cand_image) for e in fx.examples(6)]
  disk = np.lib.format.open_memmap(str(tmp_path / "c.npy"), "w+", np.float32, (6, 64))
  got = enc.encode_candidates(cands, out=disk)
  assert got.embeddings is disk
  np.testing.assert_allclose(np.load(str(tmp_path / "c.npy")),
                             enc.encode_candidates(cands).embeddings, atol=1e-6)
