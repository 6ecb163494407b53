"""Evaluation of retrieval on M-BEIR: recall@k, per-task results, summaries and tables."""
