"""The teacher's prompts and the reading of its outputs.

A template (`configs/teach.py`, one per sub-task) has a `head` shared by every query of the
sub-task (the task description and the output format: its tokens are prefilled once, the
engine's shared prefix), the image, then a `body` with the query's fields: `{instruction}`,
`{query}`, `{target}` (the positive's text), `{answer}` (in verifier templates). They are laid
out in Qwen2-VL's chat template. A TRACE-trained checkpoint used as teacher (`format="trace"`)
is prompted with its own query prompt instead and writes `reasoning answer` with no tags: its
answer is the last sentence.

The prompt budget (`fit_fields`): a prompt longer than the largest bucket has its positive's text
({target}: a knowledge entity's whole Wikipedia text) cut to fit, then the query text when that
is not enough; the head, the image tokens, the instruction, the answer being verified and the
template's fixed text stay whole. This module runs no model.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

from trace_jax.data import prompts
from trace_jax.data.tokenizer import Tokenizer
from trace_jax.teach.items import TeachItem

SYSTEM = "You are a helpful assistant."
FORMATS = ("tagged", "trace")
_LAST_SENTENCE = re.compile(r"^(.*[.!?])\s+(\S[^.!?]*)$", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Template:
  head: str  # Shared by every query of the sub-task.
  body: str  # With `{instruction}`, `{query}`, `{target}`, `{answer}` fields.
  image: str = "query"  # Which image the prompt shows: "query", "target" or "none".

  def image_of(self, item: TeachItem) -> str | None:
    return {"query": item.query_image, "target": item.target_image, "none": None}[self.image]

  def fill(self, item: TeachItem, answer: str = "") -> str:
    return self.body.format(instruction=item.instruction, query=item.query_text,
                            target=item.target_text, answer=answer)


def chat_ids(tok: Tokenizer, head: str, image_tokens: int, body: str) -> tuple[list[int], int]:
  """(prompt ids in the chat template, how many leading ids are the shared prefix: the system
  turn and `head`, before the image)."""
  start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
  ids = [start] + tok.encode(f"system\n{SYSTEM}") + [end] + tok.encode("\n")
  ids += [start] + tok.encode("user\n") + tok.encode(head)
  shared = len(ids)
  if image_tokens:
    ids += ([tok.token_to_id("<|vision_start|>")] + [tok.token_to_id("<|image_pad|>")]
            * image_tokens + [tok.token_to_id("<|vision_end|>")])
  ids += tok.encode(body) + [end] + tok.encode("\n") + [start] + tok.encode("assistant\n")
  return ids, shared


def trace_ids(tok: Tokenizer, item: TeachItem, image_tokens: int, compact: bool) -> list[int]:
  """A TRACE model's own query prompt for the item (instruction, then the query text)."""
  text = f"{item.instruction} {item.query_text}".strip()
  enc = prompts.encode_query(tok, text, image_tokens if item.query_image else 0, None, compact)
  return list(enc.ids[:enc.prompt_len])


def teacher_output(text: str, output_format: str) -> str:
  """The raw teacher output to record: a tagged teacher's text up to its `</answer>`; a TRACE
  teacher's `reasoning answer` split at its last sentence into the tagged form (a text with a
  single sentence is all answer, and the structure rule will drop it)."""
  if output_format == "tagged":
    end = text.find("</answer>")
    return (text[:end + len("</answer>")] if end >= 0 else text).strip()
  text = text.strip()
  match = _LAST_SENTENCE.match(text)
  reasoning, answer = (match.group(1), match.group(2)) if match else ("", text)
  return f"<reasoning>{reasoning.strip()}</reasoning><answer>{answer.strip()}</answer>"


def first_token_ids(tok: Tokenizer, words: Sequence[str]) -> list[int]:
  """The distinct first tokens of `words` (e.g. "yes", "Yes"): a one-token answer's ids."""
  return sorted({tok.encode(w)[0] for w in words if tok.encode(w)})


# Fields the budget may shorten, in the order it cuts them (the name in a template's body, the
# item's field).
CUTTABLE = (("target", "target"), ("query", "query_text"))


def fit_fields(tok: Tokenizer, item: TeachItem, length_of: Callable[[TeachItem], int],
               budget: int, fields: Sequence[str]) -> tuple[TeachItem, dict[str, int]]:
  """The item with its `fields` ("target", then "query") cut from the end, each only as far as
  needed, until `length_of(item) <= budget`, and how many tokens each lost ({} when it fit).

  The result may still be over budget (nothing left to cut): the caller says so. The item's
  other fields are never changed.
  """
  cuts, item = {}, item.resolved()
  for name, attr in CUTTABLE:
    over = length_of(item) - budget
    if over <= 0:
      break
    if name not in fields:
      continue
    tokens = tok.encode(getattr(item, attr))
    keep, cut = max(0, len(tokens) - over), item
    while True:  # Re-tokenising a cut text can differ by a token or two: cut until it fits.
      text = tok.decode(tokens[:keep]).rstrip("\ufffd").rstrip() if keep else ""
      cut = dataclasses.replace(item, **{attr: text})
      over = length_of(cut) - budget
      if over <= 0 or keep == 0:
        break
      keep = max(0, keep - over)
    if keep < len(tokens):
      cuts[name] = len(tokens) - keep
    item = cut
  return item, cuts
