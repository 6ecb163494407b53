"""A tiny Qwen2-like Hugging Face tokenizer, trained offline, shared by the tokenizer tests.

It mimics the Qwen2 `tokenizer.json` layout (NFC, Qwen split regex, byte-level BPE, special tokens
appended after the BPE vocab) at a few hundred ids. Nothing here touches the network.
"""

from __future__ import annotations

import json
import os
import random

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|image_pad|>")
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def corpus(n: int) -> list[str]:
  """`n` deterministic short sentences about coloured shapes."""
  rng = random.Random(0)
  colors = ("red", "green", "blue", "yellow", "black", "white")
  shapes = ("circle", "square", "triangle", "star")
  places = ("next to", "above", "below", "inside")
  return [f"a {rng.choice(colors)} {rng.choice(shapes)} {rng.choice(places)} the "
          f"{rng.choice(colors)} {rng.choice(shapes)}, hello world" for _ in range(n)]


def qwen_like_tokenizer() -> tokenizers.Tokenizer:
  """A byte-level BPE tokenizer (at most 320 BPE ids) followed by the `QWEN_SPECIALS`."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(tokenizers.Regex(QWEN_SPLIT), behavior="isolated", invert=False),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(corpus(50), trainer)
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t in QWEN_SPECIALS])
  return tok


def write_hf_dir(path, tok: tokenizers.Tokenizer, tokenizer_class: str | None = None) -> str:
  """Saves `tok` as a Hugging Face tokenizer dir; with a Qwen-like config if a class is given."""
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  if tokenizer_class is not None:
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                       "rstrip": False, "single_word": False, "special": True}
             for t in QWEN_SPECIALS}
    config = {"tokenizer_class": tokenizer_class, "added_tokens_decoder": added,
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "errors": "replace",
              "clean_up_tokenization_spaces": False, "split_special_tokens": False,
              "model_max_length": 1024}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
      json.dump(config, f)
  return str(path)
