"""Open in the paper: hard negatives. none: in-batch negatives only (the paper's setting); listed:
one of each query's `neg_cand_list` (a query listing none draws one from its pool); pool: a random
candidate of the query's pool (`trace_jax/data/negatives.py`). The demo world lists the pool's
candidates that differ from the positive in one attribute (docs/demo.md has seed 0 of each arm).
"""

MODES = ("none", "listed", "pool")


def get_sweep() -> list[dict]:
  return [{"name": m, "data.hard_negatives": m} for m in MODES]
