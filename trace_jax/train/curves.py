"""Reading `WORKDIR/metrics.jsonl` back: the logged rows of a run and the runs of a sweep folder.

Used by `tools/sweep` (final metrics per variant) and `tools/plot` (training curves). It writes
nothing and imports neither jax nor matplotlib; `train/metrics.py` writes the file.
"""

from __future__ import annotations

import json
import os

METRICS_FILE = "metrics.jsonl"


def metrics_path(workdir: str) -> str:
  return os.path.join(workdir, METRICS_FILE)


def read_metrics(workdir: str) -> list[dict]:
  """The logged rows of the run in `workdir`, one per step, sorted by step.

  A run resumed from a checkpoint older than its last log appends the replayed steps again; the
  later row of a step wins. A torn last line (a run killed mid-write) is dropped.

  Args:
    workdir: a training workdir holding `metrics.jsonl`.
  Returns:
    list of dicts, each with an int `step` and float metrics.
  Raises:
    FileNotFoundError naming the missing `metrics.jsonl`.
  """
  path = metrics_path(workdir)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no metrics file at {path} (is {workdir} a training workdir?)")
  by_step = {}
  with open(path) as f:
    lines = f.read().splitlines()
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      if i == len(lines) - 1:
        continue  # Torn final write.
      raise ValueError(f"{path}:{i + 1}: not a JSON object: {line[:80]!r}") from None
    by_step[int(row["step"])] = row
  return [by_step[s] for s in sorted(by_step)]


def final_row(workdir: str) -> dict | None:
  """The row of the last logged step, or None when `workdir` has no metrics (yet)."""
  try:
    rows = read_metrics(workdir)
  except FileNotFoundError:
    return None
  return rows[-1] if rows else None


def find_runs(sweep_dir: str) -> list[str]:
  """Names of the subfolders of `sweep_dir` that hold a `metrics.jsonl`, in sweep order.

  The order is the one `summary.json` records when `tools/sweep` wrote it, else sorted by name.
  """
  if not os.path.isdir(sweep_dir):
    return []
  names = sorted(d for d in os.listdir(sweep_dir) if os.path.isfile(metrics_path(
    os.path.join(sweep_dir, d))))
  summary = os.path.join(sweep_dir, "summary.json")
  if os.path.isfile(summary):
    with open(summary) as f:
      order = [v["name"] for v in json.load(f).get("variants", [])]
    names = [n for n in order if n in names] + [n for n in names if n not in order]
  return names
