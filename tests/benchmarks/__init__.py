"""Tests of benchmarks/ helpers."""
