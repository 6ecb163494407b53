"""The batched, compacted routing encoder equals a naive one-query-at-a-time loop."""

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


def naive(model, tok, item, max_new, mode):
  """Full forward passes, no cache: the reference for the encoder. Returns (embedding, token ids
  written before <|emb|>)."""
  n_img = 4 if item.image else 0
  enc = prompts.encode_query(tok, item.text, n_img, None, True)
  ids = list(enc.ids[:enc.prompt_len])
  pixels = None
  layout = None
  if item.image:
    pixels = resize_to_grid(f"{fx.ROOT}/{item.image}", GRID[1:])[0][None]
    layout = vision_layout(np.asarray([GRID]), model.cfg.vision, windowed=True)
  written = []
  for step in range(max_new + 1):
    arr = np.asarray([ids], np.int32)
    pos = rope_index(arr, None, np.asarray([GRID]) if item.image else None, model.cfg)
    out = model(arr, None, pixels, position_ids=pos, vision_layout=layout)
    h = np.asarray(out.hidden_states)[0, -1]
    logits = np.asarray(out.logits)[0, -1].copy()
    if mode == "direct":
      break
    if mode == "always_reason" and step == 0:
      logits[tok.emb_id] = -np.inf
    nxt = int(logits.argmax())
    if nxt == tok.emb_id or len(written) == max_new:
      break
    ids.append(nxt)
    written.append(nxt)
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


# decode_chunk 2: rows that stop mid-chunk ride along, and the batch is compacted between chunks.
# On a mesh, each batch's rows are split over the 8 test devices.
@pytest.mark.parametrize("mode,chunk,on_mesh", [
  ("adaptive", 16, False), ("adaptive", 2, False), ("direct", 16, False),
  ("always_reason", 16, False), ("always_reason", 2, False), ("adaptive", 2, True),
  ("always_reason", 16, True)])
def test_batched_encoder_equals_naive_loop(setup, mode, chunk, on_mesh):
  model, tok, items = setup
  mesh = sharding.make_mesh(data=8, fsdp=1) if on_mesh else None
  enc = Encoder(model, tok, image_grid=GRID, root=fx.ROOT, batch_size=8, prompt_buckets=(256,),
                max_new_tokens=5, compact_prompts=True, decode_chunk=chunk, mesh=mesh)
  got = enc.encode_queries(items, mode)
  for i, it in enumerate(items):
    want_emb, written = naive(model, tok, it, 5, mode)
    np.testing.assert_allclose(got.embeddings[i], want_emb, atol=2e-5, err_msg=str(i))
    assert got.texts[i] == tok.decode(written)
    assert got.reasoned[i] == bool(written)
  if mode == "adaptive":
    assert not got.reasoned[0] and got.reasoned.any()  # A mix: some rows embed at once.


def test_decode_chunk_must_be_positive(setup):
  model, tok, _ = setup
  with pytest.raises(ValueError, match="decode_chunk"):
    Encoder(model, tok, image_grid=GRID, decode_chunk=0)
