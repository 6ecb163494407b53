"""Paper ablation: training data, direct only (every target is `<|emb|>` alone, no LM loss)
versus full (reasoning targets where the CoT file routes a query to reasoning, lambda_gen = 1).

The paper's "answer only" and "reasoning only" variants need data features that do not exist
yet; docs/sweeps.md lists them.
"""


def get_sweep() -> list[dict]:
  return [
    {"name": "direct_only", "data.reasoning": False, "loss.lambda_gen": 0.0},
    {"name": "full", "data.reasoning": True, "loss.lambda_gen": 1.0},
  ]
