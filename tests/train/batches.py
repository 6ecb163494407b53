"""A small TRACE training batch for the tiny model: queries (image + text, then a target of
reasoning + <|emb|> or <|emb|> alone) and text candidates ending in <|emb|>, with their ids:
rows 1 and 6 share one candidate (an in-batch duplicate, masked out of each other's negatives)."""

from __future__ import annotations

import numpy as np

from tests.model import tiny
from trace_jax.model.positions import rope_index, vision_layout

EMB = 94
GRID = (1, 4, 8)


DUPLICATE = (1, 6)  # Rows whose queries share one positive candidate.


def make(cfg, batch: int = 8, q_len: int = 24, c_len: int = 10, seed: int = 0,
         hard_negatives: bool = False, keys: bool = True) -> dict:
  rng = np.random.default_rng(seed)
  n_img = int(np.prod(GRID)) // 4
  q_ids = np.zeros((batch, q_len), np.int32)
  q_mask = np.zeros_like(q_ids)
  q_target = np.zeros_like(q_ids)
  for b in range(batch):
    prompt = [tiny.START] + [tiny.IMAGE] * n_img + [tiny.END] + list(rng.integers(0, 80, 3))
    reasoning = list(rng.integers(0, 80, 4 + b % 3)) if b % 2 else []
    row = prompt + reasoning + [EMB]
    q_ids[b, :len(row)], q_mask[b, :len(row)] = row, 1
    q_target[b, len(prompt):len(row)] = 1
  out = {"query_ids": q_ids, "query_mask": q_mask, "query_target_mask": q_target,
         "query_is_reasoning": (np.arange(batch) % 2).astype(np.int32),
         "query_pixels": rng.standard_normal((batch, int(np.prod(GRID)), 1176)).astype(np.float32),
         "query_layout": vision_layout(np.array([GRID]), cfg.vision, windowed=True),
         "query_positions": None}
  grid = np.tile(np.array([GRID]), (batch, 1))
  out["query_positions"] = rope_index(q_ids, q_mask, grid, cfg)
  for side in ("cand",) + (("neg",) if hard_negatives else ()):
    ids = np.zeros((batch, c_len), np.int32)
    mask = np.zeros_like(ids)
    for b in range(batch):
      row = list(rng.integers(0, 80, 3 + b % 4)) + [EMB]
      ids[b, :len(row)], mask[b, :len(row)] = row, 1
    key = np.arange(batch, dtype=np.int32) + (1000 if side == "neg" else 0)
    if side == "cand":
      ids[DUPLICATE[1]], mask[DUPLICATE[1]] = ids[DUPLICATE[0]], mask[DUPLICATE[0]]
      key[DUPLICATE[1]] = key[DUPLICATE[0]]
    out.update({f"{side}_ids": ids, f"{side}_mask": mask,
                f"{side}_positions": rope_index(ids, mask, None, cfg)})
    if keys:
      out[f"{side}_key"] = key
  return out
