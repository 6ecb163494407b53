"""Examples over the mbeir_mini fixture's images, a SentencePiece tokenizer with TRACE's special
tokens, and a tiny model config whose token ids match it."""

from __future__ import annotations

import dataclasses
import glob
import os

from tests.fixtures import MBEIR_MINI
from tests.model import tiny
from trace_jax.data import prompts
from trace_jax.data.examples import TrainExample
from trace_jax.data.tokenizer import SentencePieceTokenizer

ROOT = MBEIR_MINI
WORDS = "red green blue yellow circle square triangle left right top bottom center make remove"


def images() -> list[str]:
  paths = sorted(glob.glob(os.path.join(ROOT, "mbeir_images", "*", "*", "*.jpg")))
  return [os.path.relpath(p, ROOT) for p in paths]


def examples(n: int = 24) -> list[TrainExample]:
  imgs = images()
  words = WORDS.split()
  out = []
  for i in range(n):
    task = (0, 3, 6, 7)[i % 4]
    text = " ".join(words[(i + k) % len(words)] for k in range(4))
    reasoning = f"the source shows a {words[i % 4]} {words[4 + i % 3]}" if task in (6, 7) else None
    out.append(TrainExample(
      f"fixture:{i}", f"10:{i}", task, f"Find the target. {text}" if task != 3 else "Caption it.",
      imgs[i % len(imgs)] if task in (3, 6, 7) else None, reasoning, f"10:{100 + i}",
      text if task in (3, 6) else None, imgs[(i + 5) % len(imgs)] if task in (0, 7) else None))
  return out


def tokenizer(tmp_dir: str) -> SentencePieceTokenizer:
  texts = [f"{e.query_text} {e.reasoning or ''} {e.cand_text or ''}" for e in examples()]
  texts += [prompts.SYSTEM, prompts.QUERY_RULE, prompts.CANDIDATE_RULE, "system user assistant"]
  texts = texts * 4
  return SentencePieceTokenizer.train(texts, os.path.join(tmp_dir, "sp"), vocab_size=360,
                                      user_symbols=prompts.required_tokens())


def model_config(tok):
  cfg = tiny.config(vocab_size=tok.vocab_size)
  return dataclasses.replace(cfg, image_token_id=tok.token_to_id("<|image_pad|>"),
                             vision_start_token_id=tok.token_to_id("<|vision_start|>"),
                             vision_end_token_id=tok.token_to_id("<|vision_end|>"))
