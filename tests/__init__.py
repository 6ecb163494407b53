"""trace_jax tests."""
