"""Hard negatives: one more candidate per training query that InfoNCE must rank below the query's
positive, beside the batch's other candidates (the train step's `neg` side).

`data.hard_negatives`:
- "none": in-batch negatives only (the paper's setting).
- "listed": one of the query's `neg_cand_list` (M-BEIR lists them for CIRR, NIGHTS and a few
  more; the demo world lists the candidates that differ from the positive in one attribute). A
  query that lists none gets a random candidate of its pool instead, counted and logged per file.
- "pool": a random candidate of the query's pool.

A candidate drawn from the pool has the positive's modality and is never one of the query's
positives (a listed one is taken as listed). Draws are made once, when the examples are built,
from a generator seeded by `data.seed` and the query file: the same every epoch, in every
process, and after a resume.
"""

from __future__ import annotations

import collections
import random
from typing import Mapping

from trace_jax.data import mbeir

MODES = ("none", "listed", "pool")


class NegativePicker:
  """Draws the hard negative of each query of one query file (see the module docstring)."""

  def __init__(self, mode: str, pool: Mapping[str, mbeir.Candidate], seed: int, name: str):
    if mode not in MODES:
      raise ValueError(f"data.hard_negatives={mode!r}; expected one of {MODES}")
    self.mode, self.pool = mode, pool
    self.rng = random.Random(f"{seed}/hard_negatives/{name}")
    self.by_modality: dict[str, list[str]] = collections.defaultdict(list)
    for did, cand in pool.items():
      self.by_modality[cand.modality].append(did)
    self.from_pool = 0  # Queries of "listed" that listed none and drew from the pool.

  def __call__(self, query: mbeir.Query, where: str) -> mbeir.Candidate | None:
    """The hard negative of `query` (None when the mode is "none").

    Raises:
      KeyError: a listed negative is not in the pool (names `where`, the query and the did).
      ValueError: the pool holds no candidate of the positive's modality besides the positives.
    """
    if self.mode == "none":
      return None
    if self.mode == "listed" and query.neg_cand_list:
      for did in query.neg_cand_list:
        if did not in self.pool:
          raise KeyError(f"{where}: negative candidate {did} of query {query.qid} is not in the "
                         "pool")
      return self.pool[self.rng.choice(query.neg_cand_list)]
    self.from_pool += self.mode == "listed"
    positives = set(query.pos_cand_list)
    modality = self.pool[query.pos_cand_list[0]].modality
    same = self.by_modality[modality]
    if len(same) <= sum(d in self.pool and self.pool[d].modality == modality for d in positives):
      raise ValueError(f"{where}: query {query.qid}: its pool has no candidate besides its "
                       "positives to draw a hard negative from")
    while True:
      did = self.rng.choice(same)
      if did not in positives:
        return self.pool[did]
