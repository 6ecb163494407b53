"""The layout of a training batch: its sides, each field's logical axes, and their shardings.

A batch is a flat dict of `<side>_<field>` arrays (`query_ids`, `cand_pixels`, ...) for the sides
`query`, `cand` and (hard negatives) `neg`, plus per-row fields without a side. The pipeline
(`pipeline.py`) builds it; the train step (`train/step.py`) reads it. This module builds neither.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding

from trace_jax import sharding

SIDES = ("query", "cand", "neg")
# Logical axes of each field (layouts of one image, and fields not listed, are replicated).
FIELD_AXES = {
  "ids": ("act_batch", "act_len"), "mask": ("act_batch", "act_len"),
  "target_mask": ("act_batch", "act_len"), "positions": (None, "act_batch", "act_len"),
  "pixels": ("act_batch", None, None), "is_reasoning": ("act_batch",),
  # The candidate's id (`mbeir.did_key`): in-batch duplicates of a positive are no negatives.
  "key": ("act_batch",),
}


def field_of(key: str) -> str:
  """`query_ids` -> `ids`; a key without a side is its own field."""
  side, _, field = key.partition("_")
  return field if side in SIDES and field else key


def side_of(batch: dict, side: str) -> dict:
  """The fields of one side, without the prefix."""
  return {k[len(side) + 1:]: v for k, v in batch.items() if k.startswith(side + "_")}


def batch_shardings(batch: dict, mesh) -> dict:
  """NamedShardings for a batch dict (fields by `FIELD_AXES`; other leaves replicated)."""
  def one(key, leaf):
    axes = FIELD_AXES.get(field_of(key))
    if axes is None:
      return jax.tree.map(lambda _: sharding.replicated(mesh), leaf)
    return NamedSharding(mesh, sharding.logical_to_spec(axes, leaf.shape, mesh))
  return {k: one(k, v) for k, v in batch.items()}
