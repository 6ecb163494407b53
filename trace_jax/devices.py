"""Fake CPU devices for the demo and tests: must run before JAX initialises its CPU backend."""

import os

_FLAG = "--xla_force_host_platform_device_count"


def split_cpu(n: int) -> None:
  """Splits the host CPU into `n` XLA devices (no-op for 0 or when XLA_FLAGS already says)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if n and _FLAG not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}={n}".strip()
