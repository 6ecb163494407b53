"""Inference tests."""
