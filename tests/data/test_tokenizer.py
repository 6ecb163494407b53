"""Tests of trace_jax.data.tokenizer on tiny tokenizers trained offline in tmp_path.

The Hugging Face fixture (`tests/data/tokenizer_fixture.py`) mimics the Qwen2 `tokenizer.json`
layout at a few hundred ids. No test touches the network or a real checkpoint.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import tokenizers
from tokenizers import processors

from tests.data.tokenizer_fixture import corpus, qwen_like_tokenizer, write_hf_dir
from trace_jax.data.tokenizer import (EMB_TOKEN, EOR_TOKEN, HFTokenizer, SentencePieceTokenizer,
                                      Tokenizer)

SAMPLE = "<|im_start|><|vision_start|><|image_pad|><|vision_end|>hello world, a red circle<|emb|>"
VISION_SYMBOLS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")


@pytest.fixture
def hf_dir(tmp_path) -> str:
  return write_hf_dir(tmp_path / "src", qwen_like_tokenizer(), "PreTrainedTokenizerFast")


def test_from_dir_adds_emb_once_after_base_vocab(hf_dir):
  base = tokenizers.Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
  n = base.get_vocab_size(with_added_tokens=True)
  tok = HFTokenizer.from_dir(hf_dir)
  assert isinstance(tok, Tokenizer)
  assert tok.num_base_tokens == n
  assert tok.emb_id == n
  assert tok.added_ids == [n]
  assert tok.vocab_size == n + 1
  assert tok.token_to_id("<|image_pad|>") == base.token_to_id("<|image_pad|>")


def test_from_dir_with_emb_present_adds_nothing(tmp_path):
  raw = qwen_like_tokenizer()
  raw.add_special_tokens([tokenizers.AddedToken(EMB_TOKEN, special=True, normalized=False)])
  emb_id = raw.token_to_id(EMB_TOKEN)
  tok = HFTokenizer.from_dir(write_hf_dir(tmp_path / "src", raw))
  assert tok.added_ids == []
  assert tok.num_base_tokens == tok.vocab_size == emb_id + 1
  assert tok.emb_id == emb_id


def test_encode_ends_with_emb_and_round_trips(hf_dir):
  tok = HFTokenizer.from_dir(hf_dir)
  for text in ("hello <|emb|>", "a red circle<|emb|>"):
    ids = tok.encode(text)
    assert ids[-1] == tok.emb_id
    assert ids.count(tok.emb_id) == 1
    assert tok.decode(ids) == text
  assert tok.decode(tok.encode("hello <|emb|>"), skip_special_tokens=True) == "hello "


def test_encode_adds_no_special_tokens():
  raw = qwen_like_tokenizer()
  raw.post_processor = processors.TemplateProcessing(
    single="<|im_start|> $A <|im_end|>",
    special_tokens=[(t, raw.token_to_id(t)) for t in ("<|im_start|>", "<|im_end|>")])
  tok = HFTokenizer(raw)
  assert tok.encode("hello world") == raw.encode("hello world", add_special_tokens=False).ids
  assert len(raw.encode("hello world").ids) == len(tok.encode("hello world")) + 2


def test_token_to_id_unknown_raises_key_error(hf_dir):
  with pytest.raises(KeyError, match=re.escape("<|nope|>")):
    HFTokenizer.from_dir(hf_dir).token_to_id("<|nope|>")


def test_missing_tokenizer_json_names_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "tokenizer.json"))):
    HFTokenizer.from_dir(str(tmp_path))


def test_save_and_reload_keep_emb_id(hf_dir, tmp_path):
  tok = HFTokenizer.from_dir(hf_dir)
  out = str(tmp_path / "out")
  tok.save(out)
  again = HFTokenizer.from_dir(out)
  assert again.emb_id == tok.emb_id
  assert again.added_ids == []
  assert again.encode(SAMPLE) == tok.encode(SAMPLE)
  with open(os.path.join(out, "tokenizer_config.json")) as f:
    config = json.load(f)
  assert config["added_tokens_decoder"][str(tok.emb_id)]["content"] == EMB_TOKEN
  assert config["added_tokens_decoder"][str(tok.emb_id)]["special"] is True
  assert config["eos_token"] == "<|im_end|>"


def test_extra_special_token_is_added_saved_and_reloaded(hf_dir, tmp_path):
  """data.reasoning_marker: `</think>` becomes one special token after `<|emb|>`."""
  tok = HFTokenizer.from_dir(hf_dir, extra_special=(EOR_TOKEN,))
  eor = tok.token_to_id(EOR_TOKEN)
  assert tok.added_ids == [tok.emb_id, eor] and eor == tok.emb_id + 1
  ids = tok.encode(f"a plan {EOR_TOKEN} a cat")
  assert ids.count(eor) == 1 and tok.decode(ids) == f"a plan {EOR_TOKEN} a cat"
  out = str(tmp_path / "out")
  tok.save(out)
  again = HFTokenizer.from_dir(out, extra_special=(EOR_TOKEN,))
  assert again.added_ids == [] and again.token_to_id(EOR_TOKEN) == eor
  with open(os.path.join(out, "tokenizer_config.json")) as f:
    assert json.load(f)["added_tokens_decoder"][str(eor)]["content"] == EOR_TOKEN


def test_save_without_source_config_writes_only_tokenizer_json(tmp_path):
  tok = HFTokenizer.from_dir(write_hf_dir(tmp_path / "src", qwen_like_tokenizer()))
  tok.save(str(tmp_path / "out"))
  assert os.listdir(tmp_path / "out") == ["tokenizer.json"]


def test_save_rejects_config_with_other_token_at_emb_id(hf_dir, tmp_path):
  tok = HFTokenizer.from_dir(hf_dir)
  path = os.path.join(hf_dir, "tokenizer_config.json")
  with open(path) as f:
    config = json.load(f)
  config["added_tokens_decoder"][str(tok.emb_id)] = {"content": "<|other|>", "special": True}
  with open(path, "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match="added_tokens_decoder"):
    tok.save(str(tmp_path / "out"))


@pytest.mark.parametrize("tokenizer_class", ["PreTrainedTokenizerFast", "Qwen2Tokenizer"])
def test_transformers_auto_tokenizer_agrees(tmp_path, tokenizer_class):
  transformers = pytest.importorskip("transformers")
  src = write_hf_dir(tmp_path / "src", qwen_like_tokenizer(), tokenizer_class)
  tok = HFTokenizer.from_dir(src)
  out = str(tmp_path / "out")
  tok.save(out)
  auto = transformers.AutoTokenizer.from_pretrained(out)
  assert auto.convert_tokens_to_ids(EMB_TOKEN) == tok.emb_id
  assert auto(SAMPLE, add_special_tokens=False)["input_ids"] == tok.encode(SAMPLE)
  assert len(auto) == tok.vocab_size


def _train_sp(prefix) -> SentencePieceTokenizer:
  return SentencePieceTokenizer.train(corpus(200), str(prefix), vocab_size=320,
                                      user_symbols=VISION_SYMBOLS)


def test_sentencepiece_training_is_deterministic(tmp_path):
  a = _train_sp(tmp_path / "a" / "sp")
  b = _train_sp(tmp_path / "b" / "sp")
  assert os.path.isfile(tmp_path / "a" / "sp.model")
  assert a.vocab_size == b.vocab_size == 320
  for text in corpus(20) + [SAMPLE, "unseen wörds 😀 42"]:
    assert a.encode(text) == b.encode(text)


def test_sentencepiece_user_symbols_are_single_ids(tmp_path):
  tok = _train_sp(tmp_path / "sp")
  assert isinstance(tok, Tokenizer)
  ids = tok.encode("a red circle<|emb|>")
  assert ids[-1] == tok.emb_id
  assert ids.count(tok.emb_id) == 1
  for symbol in (EMB_TOKEN, *VISION_SYMBOLS):
    symbol_id = tok.token_to_id(symbol)
    assert tok.encode(f"red{symbol}circle").count(symbol_id) == 1
    assert tok.encode(symbol)[-1] == symbol_id


def test_sentencepiece_encode_decode(tmp_path):
  tok = _train_sp(tmp_path / "sp")
  reloaded = SentencePieceTokenizer.from_file(str(tmp_path / "sp.model"))
  text = "a red circle<|emb|> unseen wörds 😀"
  ids = tok.encode(text)
  assert reloaded.encode(text) == ids
  assert tok.token_to_id("<s>") not in ids and tok.token_to_id("</s>") not in ids
  assert tok.token_to_id("<unk>") not in ids
  assert tok.decode(ids) == text
  with pytest.raises(KeyError, match=re.escape("<|nope|>")):
    tok.token_to_id("<|nope|>")


def test_sentencepiece_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none.model"))):
    SentencePieceTokenizer.from_file(str(tmp_path / "none.model"))
  with pytest.raises(ValueError, match="model_type"):
    SentencePieceTokenizer.train(["a b"], str(tmp_path / "sp"), 300, model_type="word")


def test_sentencepiece_backbone_gets_emb_appended_after_its_pieces(tmp_path):
  """A backbone's tokenizer (trained without `<|emb|>`) gets it as one more id, as `HFTokenizer`
  adds it: the existing ids stay, `added_ids` names the new row for `vocab.add_token_rows`."""
  base = SentencePieceTokenizer.train(corpus(200), str(tmp_path / "base"), vocab_size=320,
                                      user_symbols=VISION_SYMBOLS, add_emb=False)
  with pytest.raises(KeyError):
    base.emb_id
  assert base.vocab_size == 320 and base.added_ids == []
  grown = SentencePieceTokenizer.from_file(str(tmp_path / "base.model"))
  assert (grown.vocab_size, grown.num_base_tokens, grown.added_ids) == (321, 320, [320])
  assert grown.emb_id == 320
  text = "a red circle<|image_pad|> unseen"
  assert grown.encode(text) == base.encode(text)
  assert grown.encode(f"a red circle{EMB_TOKEN}")[-1] == 320
  # Saved with the new token, it reloads with the same ids and nothing more to add.
  again = SentencePieceTokenizer.from_file(grown.save(str(tmp_path / "grown")))
  assert (again.vocab_size, again.emb_id, again.added_ids) == (321, 320, [])
  assert SentencePieceTokenizer.from_file(str(tmp_path / "base.model"),
                                          add_emb=False).vocab_size == 320
