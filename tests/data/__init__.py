"""Tests of trace_jax.data."""
