"""Tests of trace_jax.eval."""
