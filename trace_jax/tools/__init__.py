"""Command-line tools: one command per module."""
