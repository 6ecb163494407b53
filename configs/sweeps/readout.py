"""Paper ablation: which hidden state is the embedding.

pre_token: the position before `<|emb|>` (paper default); emb: the `<|emb|>` token itself;
end_of_reasoning: the end-of-reasoning marker `</think>`, which this variant writes between the
reasoning and the answer (`data.reasoning_marker`); queries that embed at once have none and read
the pre-token. Evaluation reads the same position (`trace_jax.infer.encode`). The marker makes
reasoning queries a token or two longer: on the demo pass `--extra=--config.data.query_len=88`.
"""

READOUTS = ("pre_token", "emb", "end_of_reasoning")


def get_sweep() -> list[dict]:
  return [{"name": r, "loss.readout": r, "data.reasoning_marker": r == "end_of_reasoning"}
          for r in READOUTS]
