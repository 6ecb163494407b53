"""Tests of process set-up (`trace_jax.devices`): `huge_page_malloc` re-executes the process with
glibc's huge-page tunable, keeps its command line and the caller's tunables, respects an explicit
choice, and the re-executed process really faults in a large malloc 2 MiB at a time."""

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
