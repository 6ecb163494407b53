"""Process and device set-up that must happen before JAX initialises its backends: huge pages
for host memory, fake CPU devices (and thread pools for their collectives) for the demo and tests,
and `jax.distributed` for runs of several processes."""

import os
import platform
import re
import sys

_FLAG = "--xla_force_host_platform_device_count"
_NPROC = "PJRT_NPROC"
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
  """Splits the host CPU into `n` XLA devices (none for 0; a count already in XLA_FLAGS wins) and,
  for more than one device, sets `PJRT_NPROC` so that XLA:CPU's thread pools hold twice as many
  threads as devices (or one per core, if more). A PJRT_NPROC already set is kept.

  Why: XLA:CPU runs each device's collectives as rendezvous that block a pool thread, and sizes
  its pools (client and intra-op) to max(cores, devices), one thread per device on a 2-core
  machine. That suffices only while no device blocks in two collectives at once and nothing else
  holds a pool thread; with jax 0.10.2 neither holds, and a device whose collective finds no free
  thread never arrives, so the others wait until XLA aborts ("may be stuck", "Termination
  timeout"):
  - collectives overlap: a collective after a while loop is ordered after the loop's collectives
    only by a scheduling edge, released when the loop starts (XLA's thunk_executor.cc), and a
    program loaded from the persistent compilation cache loses even that (thunk_proto_serdes.cc
    gives loop bodies a collective resource of their own). Demo with data=4 x fsdp=2, fresh, on a
    loaded machine: 7 devices in all-gather op 1, one of devices [4, 5] in the scanned layers'
    all-gather op 56, 4 of 4 runs aborted. Train step with fsdp=8 loaded from the cache: all 8
    intra-op threads blocked (gdb), 7 in the layers' all-gather, 1 in a later all-reduce; 10 of 10.
  - more than 32 programs in flight per device: each launch then waits for a slot on a client
    thread, holding the threads the running program needs (gdb: 3 launches waiting, 3 devices'
    executions queued).
  With two threads per device all of these run (tests/test_cpu_collectives.py reproduces the last
  two), and the demo's step is no slower.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if n and _FLAG not in flags:
    flags = os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}={n}".strip()
  counts = re.findall(rf"{_FLAG}=(\d+)", flags)
  devices = int(counts[-1]) if counts else 0  # XLA reads the last one.
  if devices > 1:
    os.environ.setdefault(_NPROC, str(max(_xla_default_threads(), 2 * devices)))


def _xla_default_threads() -> int:
  """The thread count XLA picks without PJRT_NPROC: NPROC if set, else the usable cores."""
  nproc = os.environ.get("NPROC", "")
  if nproc.isdigit():
    return int(nproc)
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def init_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
  """Joins a multi-process run. `num_processes` > 1 uses the given coordinator and id (local
  multi-process runs, clusters); -1 lets JAX detect them (TPU pods, SLURM); 1 does nothing."""
  import jax  # Imported here: the callers set XLA_FLAGS first.
  if num_processes == -1:
    jax.distributed.initialize()
  elif num_processes > 1:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
