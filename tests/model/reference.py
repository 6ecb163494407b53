"""Tiny random transformers models and inputs in the Hugging Face processor's format."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import transformers

IMAGE, VIDEO, START, END = 290, 291, 292, 293


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  family: str  # qwen2_vl | qwen2_5_vl
  kv_heads: int
  tie: bool
  grids: tuple  # One (t, h, w) per image, shared by every row that has images.
  images_per_row: int = 1
  padding: str = "right"


def hf_config(case: Case, vocab: int = 300):
  text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=case.kv_heads,
              tie_word_embeddings=case.tie,
              rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                               "rope_theta": 10000.0})
  ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START,
             vision_end_token_id=END, tie_word_embeddings=case.tie)
  if case.family == "qwen2_5_vl":
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  fullatt_block_indexes=[1], window_size=56)
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
  vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2)
  return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)


def hf_model(case: Case, seed: int = 0):
  torch.manual_seed(seed)
  cfg = hf_config(case)
  cls = (transformers.Qwen2_5_VLForConditionalGeneration if case.family == "qwen2_5_vl"
         else transformers.Qwen2VLForConditionalGeneration)
  model = cls(cfg).eval()
  with torch.no_grad():  # Random, non-trivial norms and biases (HF initialises them to 1 and 0).
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name or "ln_q" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def inputs(case: Case, batch: int = 2, text_len: int = 7, seed: int = 0) -> dict:
  """Rows of text with `images_per_row` images; rows differ in length and are padded."""
  rng = np.random.default_rng(seed)
  rows, grids = [], []
  for b in range(batch):
    row = list(rng.integers(0, 280, 3))
    for g in case.grids[:case.images_per_row] if case.images_per_row else []:
      row += [START] + [IMAGE] * (int(np.prod(g)) // 4) + [END] + list(rng.integers(0, 280, 2))
      grids.append(g)
    row += list(rng.integers(0, 280, text_len - 2 * b))
    rows.append(row)
  width = max(map(len, rows))
  ids = np.zeros((batch, width), np.int64)
  mask = np.zeros((batch, width), np.int64)
  for b, row in enumerate(rows):
    sl = slice(0, len(row)) if case.padding == "right" else slice(width - len(row), width)
    ids[b, sl], mask[b, sl] = row, 1
  out = {"input_ids": ids, "attention_mask": mask}
  if grids:
    n = sum(int(np.prod(g)) for g in grids)
    out["pixel_values"] = rng.standard_normal((n, 3 * 2 * 14 * 14)).astype(np.float32)
    out["image_grid_thw"] = np.asarray(grids, np.int64)
  return out


def hf_forward(model, batch: dict):
  """(logits, last hidden state) of the reference implementation, float32 numpy."""
  kw = {k: torch.tensor(v) for k, v in batch.items()}
  kw["mm_token_type_ids"] = (kw["input_ids"] == IMAGE).long()
  with torch.no_grad():
    out = model(**kw, output_hidden_states=True)
  return out.logits.numpy(), out.hidden_states[-1].numpy()
