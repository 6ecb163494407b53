"""Paper ablation: training data. direct only (every target is `<|emb|>` alone, no LM loss),
answer only and reasoning only (one part of the teacher's output), and full (reasoning then
answer), for the queries the CoT file routes to reasoning.
"""


def get_sweep() -> list[dict]:
  return [
    {"name": "direct_only", "data.target": "direct", "loss.lambda_gen": 0.0},
    {"name": "answer_only", "data.target": "answer", "loss.lambda_gen": 1.0},
    {"name": "reasoning_only", "data.target": "reasoning", "loss.lambda_gen": 1.0},
    {"name": "full", "data.target": "full", "loss.lambda_gen": 1.0},
  ]
