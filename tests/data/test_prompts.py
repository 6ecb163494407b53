"""TRACE's prompts as token ids: the chat template, targets, and the truncation policy (a long
text is cut at its end, the instruction, the image tokens, the rule and the target kept whole)."""

import pytest

from tests.data import pipeline_fixture as fx
from trace_jax.data import prompts

INSTRUCTION = "Find the target."


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return fx.tokenizer(str(tmp_path_factory.mktemp("sp")))


def long_text(n_words: int) -> str:
  return INSTRUCTION + " " + " ".join(fx.WORDS.split()[i % 14] for i in range(n_words))


def test_query_prompt_layout(tok):
  enc = prompts.encode_query(tok, long_text(6), 4, "the source shows a red circle")
  ids = list(enc.ids)
  assert ids[:enc.prompt_len].count(tok.token_to_id("<|image_pad|>")) == 4
  assert ids[-1] == tok.emb_id and enc.text_cut == 0
  assert enc.target_mask == (0,) * enc.prompt_len + (1,) * (len(ids) - enc.prompt_len)
  assert tok.decode(ids[enc.prompt_len:-1]) == "the source shows a red circle"
  rule = tok.encode(f"\n{prompts.QUERY_RULE}")
  assert tok.decode(ids[:enc.prompt_len]).count(prompts.QUERY_RULE) == 1
  assert len(rule) > 3


@pytest.mark.parametrize("side", ["query", "candidate"])
def test_text_cut_to_max_text_tokens_keeps_the_rest_whole(tok, side):
  text = long_text(300)

  def encode(max_text_tokens=0):
    if side == "query":
      return prompts.encode_query(tok, text, 4, "a red circle", max_text_tokens=max_text_tokens)
    return prompts.encode_candidate(tok, text, 4,
                                    limits=prompts.CandidateLimits(text_tokens=max_text_tokens))

  whole, cut = encode(), encode(max_text_tokens=50)
  n_text = len(tok.encode(text))
  assert whole.text_cut == 0 and cut.text_cut == n_text - 50
  assert len(whole.ids) - len(cut.ids) in range(cut.text_cut - 2, cut.text_cut + 3)
  decoded = tok.decode(list(cut.ids[:cut.prompt_len]))
  rule = prompts.QUERY_RULE if side == "query" else prompts.CANDIDATE_RULE
  assert INSTRUCTION in decoded and decoded.rstrip().count(rule) == 1  # Instruction and rule.
  assert cut.ids[cut.prompt_len:] == whole.ids[whole.prompt_len:]  # The target is whole.
  image = tok.token_to_id("<|image_pad|>")
  assert cut.ids.count(image) == whole.ids.count(image) == 4
  head = tok.encode(text)[:50]  # The kept text is the text's start, token for token.
  assert any(list(cut.ids[i:i + 50]) == head for i in range(len(cut.ids)))


def test_max_len_cuts_the_text_to_fit_the_whole_sequence(tok):
  text = long_text(300)
  enc = prompts.encode_query(tok, text, 4, "the source shows a red circle", max_len=300)
  assert len(enc.ids) <= 300 and enc.text_cut > 0 and enc.ids[-1] == tok.emb_id
  short = prompts.encode_query(tok, long_text(3), 4, None, max_len=300)
  assert short.text_cut == 0  # A sequence that fits is not touched.
  assert short == prompts.encode_query(tok, long_text(3), 4, None)


def test_too_long_without_any_text_raises(tok):
  with pytest.raises(prompts.PromptTooLongError, match="without any of its text"):
    prompts.encode_query(tok, long_text(10), 4, "red " * 200, max_len=60)


def test_chat_turn_has_no_rule_and_no_emb(tok):
  """A backbone's pretraining turn: the user's text and image, then `response <|im_end|>`."""
  enc = prompts.encode_chat(tok, "Describe the image.", 4, "a red circle top left",
                            compact=True)
  ids = list(enc.ids)
  assert tok.emb_id not in ids
  assert ids[-1] == tok.token_to_id("<|im_end|>")
  assert tok.decode(ids[enc.prompt_len:-1]) == "a red circle top left"
  assert enc.target_mask == (0,) * enc.prompt_len + (1,) * (len(ids) - enc.prompt_len)
  prompt = tok.decode(ids[:enc.prompt_len])
  assert "Describe the image." in prompt and prompts.COMPACT_QUERY_RULE not in prompt
  assert ids[:enc.prompt_len].count(tok.token_to_id("<|image_pad|>")) == 4
  cut = prompts.encode_chat(tok, long_text(300), 0, "a red circle", True, max_len=40)
  assert len(cut.ids) == 40 and cut.text_cut > 0
  assert tok.decode(list(cut.ids[cut.prompt_len:-1])) == "a red circle"
