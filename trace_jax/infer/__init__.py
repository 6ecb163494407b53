"""Inference: the implicit-routing encoder and retrieval."""
