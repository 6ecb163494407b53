"""The teacher's prompts and the reading of its outputs.

A template (`configs/teach.py`, one per sub-task) has a `head` shared by every query of the
sub-task (the task description and the output format: its tokens are prefilled once, the
engine's shared prefix), the image, then a `body` with the query's fields: `{instruction}`,
`{query}`, `{target}` (the positive's text), `{answer}` (in verifier templates). They are laid
out in Qwen2-VL's chat template. A TRACE-trained checkpoint used as teacher (`format="trace"`)
is prompted with its own query prompt instead and writes `reasoning answer` with no tags: its
answer is the last sentence. This module runs no model.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

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
