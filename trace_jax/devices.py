"""Process and device set-up that must happen before JAX initialises its backends: fake CPU
devices for the demo and tests, and `jax.distributed` for runs of several processes."""

import os

_FLAG = "--xla_force_host_platform_device_count"


def split_cpu(n: int) -> None:
  """Splits the host CPU into `n` XLA devices (no-op for 0 or when XLA_FLAGS already says)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if n and _FLAG not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}={n}".strip()


def init_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
  """Joins a multi-process run. `num_processes` > 1 uses the given coordinator and id (local
  multi-process runs, clusters); -1 lets JAX detect them (TPU pods, SLURM); 1 does nothing."""
  import jax  # Imported here: the callers set XLA_FLAGS first.
  if num_processes == -1:
    jax.distributed.initialize()
  elif num_processes > 1:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
