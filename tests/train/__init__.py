"""Train tests."""
