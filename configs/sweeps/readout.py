"""Paper ablation: which hidden state is the embedding.

pre_token: the position before `<|emb|>` (paper default); emb: the `<|emb|>` token itself;
end_of_reasoning: the last `loss.eor_token_id` before `<|emb|>`. The data pipeline writes no
end-of-reasoning marker yet and `loss.eor_token_id` defaults to -1, so that variant falls back to
the pre-token position until a config sets a marker id that the data contains (docs/sweeps.md).
"""

READOUTS = ("pre_token", "emb", "end_of_reasoning")


def get_sweep() -> list[dict]:
  return [{"name": r, "loss.readout": r} for r in READOUTS]
