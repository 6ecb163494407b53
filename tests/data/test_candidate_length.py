"""The candidate-length policy: training and evaluation cut a candidate alike, and the real
configs hold LamRA's 1,024-token candidate text whole in both."""

import dataclasses
import importlib

import pytest
from flax import nnx

from configs import common
from tests.data import pipeline_fixture as fx
from trace_jax.data import prompts
from trace_jax.data import setup as data_setup
from trace_jax.eval import mbeir_eval
from trace_jax.infer.encode import Encoder, Item
from trace_jax.model import QwenVL

REAL_CONFIGS = ("qwen2_vl_2b", "qwen2_vl_7b", "qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen2_5_vl_72b")
WORDS = fx.WORDS.split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return fx.tokenizer(str(tmp_path_factory.mktemp("sp")))


@pytest.fixture(scope="module")
def model(tok):
  """The encoder's model, abstract: building prompts runs no weights."""
  return nnx.eval_shape(lambda: QwenVL(fx.model_config(tok), rngs=nnx.Rngs(0)))


def words(n: int) -> str:
  return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def candidates(tok):
  """(text, image) pairs: text only, image and text, image only, and texts past 1,024 tokens
  (one with an image), past the tighter limits below, and one just under 1,024."""
  image = fx.images()[0]
  long_text = words(480)
  assert len(tok.encode(long_text)) > 1024
  just_under = words(400)
  assert len(tok.encode(just_under)) < 1024
  return [("a red circle top left", None), ("a blue square", image), (None, image),
          (long_text, None), (long_text, image), (just_under, None), (words(60), image)]


def config(**data):
  c = common.base_config()
  c.data.root = fx.ROOT
  c.data.update(data)
  return c


LIMITS = {  # The real defaults, and tight limits where each of the two cuts bites.
  "defaults": {},
  "text_tokens": dict(cand_text_tokens=40, cand_len=260, cand_buckets=(), prompt_buckets=(259,)),
  "cand_len": dict(cand_text_tokens=0, cand_len=240, cand_buckets=(64,),
                   prompt_buckets=(64, 239)),
}


@pytest.mark.parametrize("limits", list(LIMITS))
def test_training_and_evaluation_encode_a_candidate_alike(tok, model, limits):
  kw = dict(LIMITS[limits])
  c = config()
  c.eval.prompt_buckets = kw.pop("prompt_buckets", c.eval.prompt_buckets)
  c.data.update(kw)
  to_arrays = data_setup.make_transform(c.data, tok, model.cfg)  # As `train_dataset` builds it.
  encoder = mbeir_eval.make_encoder(c, model, tok, fx.ROOT)  # As evaluation builds it.
  base = fx.examples(1)[0]
  cut = []
  for i, (text, image) in enumerate(candidates(tok)):
    ex = dataclasses.replace(base, cand_id=f"9:{i}", cand_text=text, cand_image=image)
    trained = to_arrays.map(ex.to_dict())["cand_ids"].tolist()
    enc = encoder._prompt(Item(text, image, f"9:{i}"), candidate=True)
    # Evaluation prefills the prompt and reads its last token; `<|emb|>` follows in training.
    assert list(enc.ids[:enc.prompt_len]) + [tok.emb_id] == trained, (limits, i)
    cut.append(enc.text_cut)
  if limits == "cand_len":  # The sequence's limit: an image leaves less room for the text.
    assert cut[4] > cut[3] > 0 and cut[6] > 0 and cut[:3] == [0, 0, 0]
  else:  # The text's own limit alone bites (by default LamRA's, on the 1,200-token texts).
    most = c.data.cand_text_tokens
    assert cut == [max(0, len(tok.encode(t or "")) - most) for t, _ in candidates(tok)]
    assert cut[3] > 0


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_configs_hold_a_1024_token_candidate_text(name):
  """cand_len and the largest evaluation bucket hold text 1024 + the image + the full prompt's
  fixed parts, counted at their most under any byte-level tokenizer (a token holds a byte or
  more; each special token is one)."""
  c = importlib.import_module(f"configs.{name}").get_config()
  d = c.data
  image = int(d.image_grid[0] * d.image_grid[1] * d.image_grid[2]) // 4
  text = [f"system\n{prompts.SYSTEM}", "\n", "user\n", f"\n{prompts.CANDIDATE_RULE}", "\n",
          "assistant\n"]
  specials = 3 + 2 + 2 + 1  # <|im_start|> x3, <|im_end|> x2, vision start and end, <|emb|>.
  fixed = sum(len(t.encode()) for t in text) + specials + image
  assert d.cand_text_tokens == 1024 and not d.compact_prompts
  assert d.cand_len >= d.cand_text_tokens + fixed
  assert max(c.eval.prompt_buckets) + 1 >= d.cand_len  # The prompt, without <|emb|>.
  assert data_setup.bucket_sizes(d).cand[-1] == d.cand_len


def test_limits_that_would_split_the_policy_are_refused(tok, model):
  with pytest.raises(ValueError, match=r"data.cand_buckets=\(64, 300\) must lie in"):
    data_setup.bucket_sizes(config(cand_len=200, cand_buckets=(64, 300)).data)
  with pytest.raises(ValueError, match=r"data.cand_len=200: the largest of eval.prompt_buckets"):
    Encoder(model, tok, image_grid=(1, 4, 4), prompt_buckets=(64, 128), cand_len=200)
  # Reading <|emb|> itself, the bucket must hold it too.
  Encoder(model, tok, image_grid=(1, 4, 4), prompt_buckets=(199,), cand_len=200)
  with pytest.raises(ValueError, match="holds candidates of at most 199"):
    Encoder(model, tok, image_grid=(1, 4, 4), prompt_buckets=(199,), cand_len=200,
            readout="emb")
