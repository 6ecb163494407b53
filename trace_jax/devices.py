"""Process and device set-up that must happen before JAX initialises its backends: huge pages
for host memory, fake CPU devices for the demo and tests, and `jax.distributed` for runs of several
processes."""

import os
import platform
import sys

_FLAG = "--xla_force_host_platform_device_count"
_HUGETLB = "glibc.malloc.hugetlb"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_page_malloc() -> None:
  """Re-executes this process (same PID, command line and environment) with glibc's malloc asking
  the kernel for transparent huge pages, `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, where that helps:
  glibc 2.35 or later, THP in `madvise` mode, and GLIBC_TUNABLES not naming the tunable already
  (set `glibc.malloc.hugetlb=0` there to opt out). Call it first thing in `__main__`.

  XLA:CPU mallocs each execution's temporary buffer afresh, and glibc serves an allocation that
  large from a new `mmap` (threads' arenas do so whatever `mmap_max` says) and unmaps it on free,
  so every page of it faults in again on every step: 2.1 M faults and 5-7 s of system time per
  step of `benchmarks/train_step.py`. A huge page maps 2 MiB per fault instead of 4 KiB
  (docs/benchmarks.md)."""
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if _HUGETLB in tunables or not sys.executable or not huge_pages_supported():
    return
  env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, (tunables, f"{_HUGETLB}=1"))))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def huge_pages_supported() -> bool:
  """Whether glibc knows the tunable (2.35 or later) and the kernel gives transparent huge pages
  to memory that asks for them, and only to that (`madvise` mode)."""
  libc, version = platform.libc_ver()
  if libc != "glibc" or tuple(map(int, version.split(".")[:2])) < (2, 35):
    return False
  try:
    with open(_THP) as f:
      return "[madvise]" in f.read()
  except OSError:
    return False


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
