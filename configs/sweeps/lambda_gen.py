"""Paper ablation: weight of the generation (LM) loss, lambda_gen in {0, 0.5, 1, 2}.

lambda_gen = 0 keeps the reasoning targets in the data but trains only the contrastive loss.
"""

LAMBDAS = (0.0, 0.5, 1.0, 2.0)


def get_sweep() -> list[dict]:
  return [{"name": f"lambda_gen_{str(v).replace('.', 'p')}", "loss.lambda_gen": v}
          for v in LAMBDAS]
