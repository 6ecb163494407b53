"""TRACE's prompts in Qwen2.5-VL's chat template, as token ids.

The query prompt carries the task instruction, the query (text and/or image) and the retrieval
rule: simple queries answer with `<|emb|>` alone, hard ones first describe the target
(TRACE.md, "Prompts"). The candidate prompt demands `<|emb|>` only (or, for the candidate-side
reasoning ablation, allows a description first). The rule text names the token
in words so that the only `<|emb|>` in a sequence is the one the model writes. This module does
not read images or pad batches.
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


def _user_turn(tok: Tokenizer, text: str, image_tokens: int, compact: bool) -> list[int]:
  ids = []
  if not compact:
    ids += [tok.token_to_id("<|im_start|>")] + tok.encode(f"system\n{SYSTEM}")
    ids += [tok.token_to_id("<|im_end|>")] + tok.encode("\n")
  ids += [tok.token_to_id("<|im_start|>")] + tok.encode("user\n")
  if image_tokens:
    pad = tok.token_to_id("<|image_pad|>")
    ids += ([tok.token_to_id("<|vision_start|>")] + [pad] * image_tokens
            + [tok.token_to_id("<|vision_end|>")])
  ids += tok.encode(text) + [tok.token_to_id("<|im_end|>")] + tok.encode("\n")
  return ids + [tok.token_to_id("<|im_start|>")] + tok.encode("assistant\n")


def encode_query(tok: Tokenizer, query_text: str, image_tokens: int,
                 reasoning: str | None = None, compact: bool = False) -> Encoded:
  """The query prompt, then the target: `reasoning <|emb|>` or `<|emb|>` alone.

  Args:
    query_text: the task instruction followed by the query text (may be only the instruction).
    image_tokens: number of `<|image_pad|>` tokens (merged patches) of the query image, or 0.
    reasoning: the teacher's text with its tags stripped, or None for a direct example.
    compact: no system turn and the one-line rule (`data.compact_prompts`).
  """
  rule = COMPACT_QUERY_RULE if compact else QUERY_RULE
  prompt = _user_turn(tok, f"{query_text}\n{rule}" if query_text else rule, image_tokens, compact)
  target = (tok.encode(reasoning) if reasoning else []) + [tok.emb_id]
  return Encoded(tuple(prompt + target), (0,) * len(prompt) + (1,) * len(target), len(prompt))


def encode_candidate(tok: Tokenizer, text: str | None, image_tokens: int,
                     compact: bool = False, *, may_reason: bool = False,
                     reasoning: str | None = None) -> Encoded:
  """The candidate prompt followed by `<|emb|>`: candidates never reason (TRACE.md, "Model").

  `may_reason` is the candidate-side reasoning ablation: the prompt allows a description first,
  the target is `reasoning <|emb|>` (or `<|emb|>` alone) and is supervised like a query's. Without
  it, nothing of a candidate is a target.
  """
  if reasoning and not may_reason:
    raise ValueError("a candidate target needs may_reason=True")
  if may_reason:
    rule = COMPACT_CANDIDATE_REASON_RULE if compact else CANDIDATE_REASON_RULE
  else:
    rule = COMPACT_CANDIDATE_RULE if compact else CANDIDATE_RULE
  prompt = _user_turn(tok, f"{text}\n{rule}" if text else rule, image_tokens, compact)
  target = (tok.encode(reasoning) if reasoning else []) + [tok.emb_id]
  return Encoded(tuple(prompt + target), (0,) * len(prompt) + (int(may_reason),) * len(target),
                 len(prompt))


def required_tokens() -> tuple[str, ...]:
  """Special tokens a tokenizer must have for these prompts (user symbols for SentencePiece)."""
  return SPECIAL + (EMB_TOKEN,)
