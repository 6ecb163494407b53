"""Paper ablation: reasoning on the candidate side. none: candidates embed at once (the paper's
setting); answer / full: the positive candidate of a reasoning query learns to write that part of
the query's teacher output (the answer describes this very candidate) before its `<|emb|>`, and
evaluation encodes every candidate by generation (docs/sweeps.md). Candidates then need room for
the text: pass `--extra=--config.data.cand_len=N` (the demo: 80).
"""

CAND_TARGETS = ("none", "answer", "full")


def get_sweep() -> list[dict]:
  return [{"name": t, "data.cand_target": t} for t in CAND_TARGETS]
