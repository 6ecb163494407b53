"""A tiny random ModelConfig/QwenVL with non-trivial norms and biases, and inputs for it."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from trace_jax.model import ModelConfig, QwenVL, TextConfig, VisionConfig

IMAGE, START, END = 90, 92, 93


def config(family: str = "qwen2_5_vl", **text) -> ModelConfig:
  t = dict(vocab_size=96, width=64, mlp_dim=96, num_layers=2, num_heads=4, num_kv_heads=2,
           mrope_section=(2, 3, 3), rope_theta=10000.0)
  t.update(text)
  v = VisionConfig(depth=2, width=32, mlp_dim=64, num_heads=2, out_width=t["width"],
                   window_size=56, fullatt_block_indexes=(1,),
                   act="silu" if family == "qwen2_5_vl" else "quick_gelu")
  return ModelConfig(family=family, text=TextConfig(**t), vision=v, image_token_id=IMAGE,
                     video_token_id=91, vision_start_token_id=START, vision_end_token_id=END,
                     dtype="float32", param_dtype="float32")


def perturb(model: QwenVL, seed: int = 1) -> QwenVL:
  """Adds noise to every parameter so that biases and norm scales are not 0 and 1."""
  graphdef, state = nnx.split(model)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


def model(cfg: ModelConfig | None = None, seed: int = 0) -> QwenVL:
  return perturb(QwenVL(cfg or config(), rngs=nnx.Rngs(seed)))


def batch(padding: str = "left", grids=((1, 4, 8),), lengths=(9, 6), seed: int = 0) -> dict:
  """Two rows: text, one image per row, text; rows of different lengths, padded."""
  rng = np.random.default_rng(seed)
  rows, all_grids = [], []
  for n in lengths:
    row = list(rng.integers(0, 80, 2))
    for g in grids:
      row += [START] + [IMAGE] * (int(np.prod(g)) // 4) + [END]
      all_grids.append(g)
    rows.append(row + list(rng.integers(0, 80, n)))
  width = max(map(len, rows))
  ids = np.zeros((len(rows), width), np.int32)
  mask = np.zeros_like(ids)
  for b, row in enumerate(rows):
    sl = slice(0, len(row)) if padding == "right" else slice(width - len(row), width)
    ids[b, sl], mask[b, sl] = row, 1
  pixels = rng.standard_normal((sum(int(np.prod(g)) for g in all_grids), 1176)).astype(np.float32)
  return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
          "image_grid_thw": np.asarray(all_grids)}


def with_cfg(cfg: ModelConfig, **kw) -> ModelConfig:
  return dataclasses.replace(cfg, **kw)
