"""Tests of process set-up (`trace_jax.devices`): `huge_page_malloc` re-executes the process with
glibc's huge-page tunable, keeps its command line and the caller's tunables, respects an explicit
choice, and the re-executed process really faults in a large malloc 2 MiB at a time; `split_cpu`
keeps the user's XLA flags and gives XLA:CPU's thread pools two threads per fake device."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from trace_jax import devices

REPO = pathlib.Path(__file__).resolve().parent.parent
MIB = 1 << 20
NEEDS_HUGE_PAGES = pytest.mark.skipif(not devices.huge_pages_supported(),
                                      reason="needs glibc >= 2.35 and THP in madvise mode")
# Run as `python -m huge_child ARGS`: mallocs and touches 64 MiB, reports its page faults.
CHILD = """
import ctypes, json, os, resource, sys
from trace_jax import devices
devices.huge_page_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
n = 64 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(n), 1, n)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "faults": faults,
                  "argv": sys.argv[1:], "pid": os.getpid()}))
"""


def _run_child(tmp_path, tunables=None):
  (tmp_path / "huge_child.py").write_text(CHILD)
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env["PYTHONPATH"] = os.pathsep.join((str(tmp_path), str(REPO)))
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  proc = subprocess.Popen([sys.executable, "-m", "huge_child", "--flag=1", "x"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  report = json.loads(out.strip().splitlines()[-1])
  assert report["argv"] == ["--flag=1", "x"]
  assert report["pid"] == proc.pid  # Replaced in place: launchers waiting on the PID still see it.
  return report


@NEEDS_HUGE_PAGES
def test_reexec_sets_tunable_and_maps_huge_pages(tmp_path):
  report = _run_child(tmp_path)
  assert report["tunables"] == "glibc.malloc.hugetlb=1"
  assert report["faults"] < 64 * MIB // 4096 // 8  # 4 KiB pages would be 16,384 faults.


@NEEDS_HUGE_PAGES
def test_keeps_callers_tunables(tmp_path):
  report = _run_child(tmp_path, "glibc.malloc.arena_max=2")
  assert report["tunables"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_explicit_choice_is_kept(tmp_path):
  report = _run_child(tmp_path, "glibc.malloc.hugetlb=0")
  assert report["tunables"] == "glibc.malloc.hugetlb=0"
  assert report["faults"] >= 64 * MIB // 4096  # Page by page: what the tunable saves.


@pytest.mark.skipif(devices.huge_pages_supported(), reason="this machine supports huge-page malloc")
def test_no_reexec_where_unsupported(tmp_path):
  assert _run_child(tmp_path)["tunables"] is None


def test_split_cpu_keeps_user_flags_and_sizes_the_pools(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/d --xla_cpu_enable_fast_math=false")
  monkeypatch.delenv("PJRT_NPROC", raising=False)
  monkeypatch.delenv("NPROC", raising=False)
  devices.split_cpu(8)
  assert os.environ["XLA_FLAGS"].split() == [
    "--xla_dump_to=/tmp/d", "--xla_cpu_enable_fast_math=false",
    "--xla_force_host_platform_device_count=8"]
  assert int(os.environ["PJRT_NPROC"]) == max(16, len(os.sched_getaffinity(0)))


def test_split_cpu_sizes_the_pools_for_a_count_the_user_set(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  monkeypatch.delenv("PJRT_NPROC", raising=False)
  monkeypatch.setenv("NPROC", "2")
  devices.split_cpu(8)
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
  assert os.environ["PJRT_NPROC"] == "8"


def test_split_cpu_keeps_an_explicit_pool_size(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("PJRT_NPROC", "3")
  devices.split_cpu(8)
  assert os.environ["PJRT_NPROC"] == "3"


def test_split_cpu_leaves_one_device_alone(monkeypatch):
  for n in (0, 1):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("PJRT_NPROC", raising=False)
    devices.split_cpu(n)
    assert os.environ.get("XLA_FLAGS", "") == ("" if n == 0 else
                                               "--xla_force_host_platform_device_count=1")
    assert "PJRT_NPROC" not in os.environ
