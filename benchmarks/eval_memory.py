"""Host memory of a global-pool evaluation against the pool's size: peak RSS per extra candidate.

    python -m benchmarks.eval_memory --workdir=RUN --root=WORLD [--extra=20000,80000]
        [--config=configs/demo.py:steps=2,backbone=none] [--src=.] [--tasks=synthetic_task0]
    python -m benchmarks.eval_memory --root=WORLD --pipeline_only --extra=20000,320000,1280000

For each count N it copies the M-BEIR-format root WORLD with N extra candidates appended to the
union test pool (copies of its lines under new dids, images included), copies RUN's checkpoints
into a fresh workdir (no pool cached), runs `python -m trace_jax.eval --pool=global` from the
source tree `--src` (another checkout measures the code before a change) and reads the child's
peak resident memory (`os.wait4`'s ru_maxrss). It prints one JSON line per N and the slope
between the first and the last: bytes of host memory per extra candidate. `--pipeline_only`
measures the pool machinery alone (`eval/pools.py`: read, stream, write, score) with an encoder
that writes random rows at the demo's width, no model: larger N in seconds. Timing and memory
only; no test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string(
  "workdir", None, "A trained run (its checkpoints are copied); not needed with --pipeline_only.")
_ROOT = flags.DEFINE_string("root", None, "The M-BEIR-format root the run evaluates on.")
_CONFIG = flags.DEFINE_string("config", "configs/demo.py:steps=2,backbone=none",
                              "The run's config file[:args], relative to --src.")
_EXTRA = flags.DEFINE_list("extra", ["20000", "80000"], "Extra pool candidates per measurement.")
_SRC = flags.DEFINE_string("src", ".", "Source tree whose trace_jax.eval is measured.")
_TASKS = flags.DEFINE_list("tasks", ["synthetic_task0"], "Tasks scored (one is enough).")
_PIPELINE = flags.DEFINE_bool("pipeline_only", False, "Pools machinery alone, no model.")
_UNION = "cand_pool/global/mbeir_union_test_cand_pool.jsonl"


def pipeline(root: str, out_dir: str, width: int = 128) -> None:
  """Encodes and scores the union pool of `root` with `eval/pools.py` and an encoder writing
  random unit rows (run in a child process by `--pipeline_only`)."""
  import types

  import numpy as np

  from trace_jax.eval import pools
  from trace_jax.infer.encode import Encoded
  from trace_jax.infer.retrieval import top_k

  class RandomEncoder:
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(
      text=types.SimpleNamespace(width=width)))

    def encode_candidates(self, items, out):
      n = len(items)
      out[:] = np.random.default_rng(n).standard_normal((n, width))
      return Encoded(out, [""] * n, np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, np.int64))

  shard = pools.encode_pool(os.path.join(root, _UNION), RandomEncoder(), out_dir, "float32", "r")
  top_k(np.ones((8, width), np.float32), shard.embeddings, 10)


def grown_root(root: str, extra: int, out: str) -> str:
  """A copy of `root` (images linked) whose union test pool has `extra` more candidates."""
  shutil.copytree(root, out, symlinks=True,
                  ignore=lambda d, names: ["mbeir_images"] if d == root else [])
  os.symlink(os.path.abspath(os.path.join(root, "mbeir_images")),
             os.path.join(out, "mbeir_images"))
  with open(os.path.join(root, _UNION)) as f:
    lines = [json.loads(x) for x in f if x.strip()]
  with open(os.path.join(out, _UNION), "a") as f:
    for i in range(extra):
      record = dict(lines[i % len(lines)])
      record["did"] = f"{record['did'].split(':')[0]}:{10_000_000 + i}"
      f.write(json.dumps(record) + "\n")
  return out


def peak_rss(cmd: list[str], cwd: str) -> tuple[int, float]:
  """(peak resident bytes of the command's process, seconds); raises with its stderr if it
  fails. The child is reaped with `os.wait4`, whose usage is that child's alone."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  start = time.perf_counter()
  with tempfile.TemporaryFile() as err:
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # Reaped here, not by Popen.
    if proc.returncode:
      err.seek(0)
      raise RuntimeError(err.read().decode()[-3000:])
  return usage.ru_maxrss * 1024, time.perf_counter() - start


def main(argv):
  del argv
  rows = []
  for extra in map(int, _EXTRA.value):
    with tempfile.TemporaryDirectory(prefix="eval_memory_") as tmp:
      root = grown_root(_ROOT.value, extra, os.path.join(tmp, "root"))
      run = os.path.join(tmp, "run")
      if not _PIPELINE.value:  # A fresh workdir: no pool cached.
        shutil.copytree(os.path.join(_WORKDIR.value, "checkpoints"),
                        os.path.join(run, "checkpoints"))
        if os.path.isfile(os.path.join(_WORKDIR.value, "model_config.json")):
          shutil.copy(os.path.join(_WORKDIR.value, "model_config.json"), run)
      cmd = [sys.executable, "-m", "trace_jax.eval", f"--config={_CONFIG.value}",
             f"--config.data.root={root}", "--config.eval.qps_queries=0", "--pool=global",
             f"--tasks={','.join(_TASKS.value)}", f"--workdir={run}"]
      if _PIPELINE.value:
        cmd = [sys.executable, "-c", "from benchmarks.eval_memory import pipeline; "
               f"pipeline({root!r}, {os.path.join(tmp, 'pools')!r})"]
      rss, seconds = peak_rss(cmd, os.path.abspath(_SRC.value))
    rows.append({"extra_candidates": extra, "peak_rss_mb": round(rss / 2**20, 1),
                 "seconds": round(seconds, 1)})
    print(json.dumps(rows[-1]), flush=True)
  if len(rows) > 1:
    slope = ((rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]) * 2**20
             / (rows[-1]["extra_candidates"] - rows[0]["extra_candidates"]))
    print(json.dumps({"bytes_per_extra_candidate": round(slope, 1)}))


if __name__ == "__main__":
  flags.mark_flags_as_required(["root"])
  app.run(main)
