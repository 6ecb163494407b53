"""Data pipeline of trace_jax: tokenizers."""
