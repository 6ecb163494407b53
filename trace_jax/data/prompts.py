"""TRACE's prompts in Qwen2.5-VL's chat template, as token ids.

The query prompt carries the task instruction, the query (text and/or image) and the retrieval
rule: simple queries answer with `<|emb|>` alone, hard ones first describe the target
(TRACE.md, "Prompts"). The candidate prompt demands `<|emb|>` only (or, for the candidate-side
reasoning ablation, allows a description first). The rule text names the token
in words so that the only `<|emb|>` in a sequence is the one the model writes. `encode_chat`
is the plain turn a backbone learns from before TRACE (the demo's pretraining stage,
`data.target="lm"`). This module does not read images or pad batches.

The candidate-length policy is here too (`CandidateLimits`): training (`transforms.ToArrays`) and
evaluation (`infer.encode.Encoder`) both encode a candidate with `encode_candidate` under the
limits `candidate_limits(config.data)` gives, so a candidate is embedded from the same tokens in
both (docs/data.md, "Candidate length").
"""

from __future__ import annotations

import dataclasses

from trace_jax.data.tokenizer import EMB_TOKEN, Tokenizer

SYSTEM = "You are a helpful assistant."
QUERY_RULE = ("Embed the query for retrieval. If it is simple, answer with the embedding token "
              "only. If it is complex, first write a concise description of the target, then the "
              "embedding token. Write nothing after the embedding token.")
CANDIDATE_RULE = "Embed this candidate for retrieval. Answer with the embedding token only."
# Candidate-side reasoning (`data.cand_target`): the candidate may describe itself first. Both
# rules reuse the query rules' words, so the demo tokenizer (trained on those) encodes them short.
CANDIDATE_REASON_RULE = ("Embed this candidate for retrieval. If it is complex, first write a "
                         "concise description of it, then the embedding token. Write nothing "
                         "after the embedding token.")
# Compact prompts (no system turn, one-line rules) keep the CPU demo's sequences short.
COMPACT_QUERY_RULE = "Embed; reason first if complex."
COMPACT_CANDIDATE_RULE = "Embed this."
COMPACT_CANDIDATE_REASON_RULE = "Embed this; reason first if complex."
SPECIAL = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")


@dataclasses.dataclass(frozen=True)
class Encoded:
  """One sequence: ids, and 1 where a token is a training target (the assistant's answer)."""

  ids: tuple[int, ...]
  target_mask: tuple[int, ...]
  prompt_len: int  # Tokens before the answer: what inference prefills.
  text_cut: int = 0  # Tokens cut from the end of the text to fit (0: the text is whole).


@dataclasses.dataclass(frozen=True)
class CandidateLimits:
  """How long a candidate may be; one policy for training and evaluation.

  Attributes:
    text_tokens: the candidate text keeps at most its first this many tokens (LamRA's 1024,
      `data.cand_text_tokens`; 0: no limit of its own).
    max_len: the whole candidate sequence, from the chat template to `<|emb|>`, has at most this
      many tokens (`data.cand_len`; 0: no limit); a longer text loses its tail to fit. Under
      candidate-side reasoning the training target counts too (evaluation has none to count).
  """

  text_tokens: int = 0
  max_len: int = 0


def candidate_limits(data) -> CandidateLimits:
  """The limits of a config's `data` section: what training and evaluation both cut to."""
  return CandidateLimits(int(data.cand_text_tokens), int(data.cand_len))


class PromptTooLongError(ValueError):
  """The sequence exceeds its length limit even with none of its text left."""


def _turn(tok: Tokenizer, image_tokens: int, compact: bool) -> tuple[list[int], list[int]]:
  """The chat template around the user's text: (ids before it, ids after it)."""
  head = []
  if not compact:
    head += [tok.token_to_id("<|im_start|>")] + tok.encode(f"system\n{SYSTEM}")
    head += [tok.token_to_id("<|im_end|>")] + tok.encode("\n")
  head += [tok.token_to_id("<|im_start|>")] + tok.encode("user\n")
  if image_tokens:
    pad = tok.token_to_id("<|image_pad|>")
    head += ([tok.token_to_id("<|vision_start|>")] + [pad] * image_tokens
             + [tok.token_to_id("<|vision_end|>")])
  tail = [tok.token_to_id("<|im_end|>")] + tok.encode("\n")
  return head, tail + [tok.token_to_id("<|im_start|>")] + tok.encode("assistant\n")


def _text_and_rule(tok: Tokenizer, text: str, rule: str, fixed: int, max_text_tokens: int,
                   max_len: int) -> tuple[list[int], int]:
  """Ids of the user's text followed by the rule, the text's tail cut so that the text keeps at
  most `max_text_tokens` tokens (0: no limit) and the whole sequence, with its `fixed` other
  tokens, at most `max_len` (0: no limit); and how many text tokens were cut. The instruction
  (the text's start), the image and the rule stay whole."""
  whole = tok.encode(f"{text}\n{rule}" if text and rule else text or rule)
  room = max_len - fixed if max_len else len(whole)
  if len(whole) <= room and (not max_text_tokens or len(whole) <= max_text_tokens):
    return whole, 0  # Whole text and rule together are within both limits: nothing to cut.
  text_ids = tok.encode(text) if text else []
  rule_ids = (tok.encode(f"\n{rule}") if text else whole) if rule else []
  keep = min(len(text_ids), room - len(rule_ids))
  if max_text_tokens:
    keep = min(keep, max_text_tokens)
  if keep < 0:
    raise PromptTooLongError(f"{fixed + len(rule_ids)} tokens without any of its text, more than "
                             f"the limit of {max_len}")
  if keep == len(text_ids) and len(whole) <= room:
    return whole, 0
  return text_ids[:keep] + rule_ids, len(text_ids) - keep


def encode_query(tok: Tokenizer, query_text: str, image_tokens: int,
                 reasoning: str | None = None, compact: bool = False, *,
                 max_text_tokens: int = 0, max_len: int = 0) -> Encoded:
  """The query prompt, then the target: `reasoning <|emb|>` or `<|emb|>` alone.

  Args:
    query_text: the task instruction followed by the query text (may be only the instruction).
    image_tokens: number of `<|image_pad|>` tokens (merged patches) of the query image, or 0.
    reasoning: the teacher's text with its tags stripped, or None for a direct example.
    compact: no system turn and the one-line rule (`data.compact_prompts`).
    max_text_tokens: cut `query_text` to at most this many tokens (0: no limit), keeping its
      start (the instruction); the reference policy is LamRA's 480 for training queries.
    max_len: cut it further so that the whole sequence (prompt and target) has at most this
      many tokens (0: no limit).
  Raises:
    PromptTooLongError: the sequence is longer than `max_len` even without the text.
  """
  rule = COMPACT_QUERY_RULE if compact else QUERY_RULE
  target = (tok.encode(reasoning) if reasoning else []) + [tok.emb_id]
  return _encode(tok, query_text, rule, image_tokens, compact, target, True, max_text_tokens,
                 max_len)


def encode_candidate(tok: Tokenizer, text: str | None, image_tokens: int,
                     compact: bool = False, *, may_reason: bool = False,
                     reasoning: str | None = None,
                     limits: CandidateLimits = CandidateLimits()) -> Encoded:
  """The candidate prompt followed by `<|emb|>`: candidates never reason (TRACE.md, "Model").

  The one function that decides a candidate's tokens, in training and in evaluation: the chat
  template, the image tokens, the text cut to `limits` (its tail goes; the image and the rule
  stay whole), the rule, `<|emb|>`.

  Args:
    text: the candidate text (None or "": an image-only candidate).
    image_tokens: number of `<|image_pad|>` tokens of its image, or 0.
    compact: the one-line rule without a system turn (`data.compact_prompts`).
    may_reason: the candidate-side reasoning ablation: the prompt allows a description first,
      the target is `reasoning <|emb|>` (or `<|emb|>` alone) and is supervised like a query's.
      Without it, nothing of a candidate is a target.
    limits: the candidate-length policy (`candidate_limits(config.data)`).
  Raises:
    PromptTooLongError: the sequence is longer than `limits.max_len` even without the text.
  """
  if reasoning and not may_reason:
    raise ValueError("a candidate target needs may_reason=True")
  if may_reason:
    rule = COMPACT_CANDIDATE_REASON_RULE if compact else CANDIDATE_REASON_RULE
  else:
    rule = COMPACT_CANDIDATE_RULE if compact else CANDIDATE_RULE
  target = (tok.encode(reasoning) if reasoning else []) + [tok.emb_id]
  return _encode(tok, text or "", rule, image_tokens, compact, target, may_reason,
                 limits.text_tokens, limits.max_len)


def encode_chat(tok: Tokenizer, text: str, image_tokens: int, response: str,
                compact: bool = False, *, max_text_tokens: int = 0, max_len: int = 0) -> Encoded:
  """A plain chat turn, as a backbone (an MLLM before TRACE) is trained on: the user's text
  and/or image without any retrieval rule, then the target `response <|im_end|>`. No
  `<|emb|>`: a backbone's tokenizer need not have it. `max_text_tokens`, `max_len`: as
  `encode_query`."""
  target = tok.encode(response) + [tok.token_to_id("<|im_end|>")]
  return _encode(tok, text, "", image_tokens, compact, target, True, max_text_tokens, max_len)


def _encode(tok: Tokenizer, text: str, rule: str, image_tokens: int, compact: bool,
            target: list[int], supervised: bool, max_text_tokens: int, max_len: int) -> Encoded:
  head, tail = _turn(tok, image_tokens, compact)
  body, cut = _text_and_rule(tok, text, rule, len(head) + len(tail) + len(target),
                             max_text_tokens, max_len)
  prompt = head + body + tail
  return Encoded(tuple(prompt + target), (0,) * len(prompt) + (int(supervised),) * len(target),
                 len(prompt), cut)


def required_tokens() -> tuple[str, ...]:
  """Special tokens a tokenizer must have for these prompts (user symbols for SentencePiece)."""
  return SPECIAL + (EMB_TOKEN,)
