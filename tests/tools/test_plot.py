"""`tools/plot` and `train/curves`: synthetic metrics.jsonl files become valid PNGs (one run, a
sweep folder), resumed logs read back once per step, and a folder without metrics names the path."""

import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from trace_jax.tools import plot
from trace_jax.train import curves

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_metrics(workdir, steps, scale=1.0, skip=()):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for s in steps:
      row = {"step": s, "loss/total": scale * (10.0 - 0.1 * s), "loss/lm": scale * (6.0 - 0.05 * s),
             "loss/contrastive": scale * (4.0 - 0.05 * s), "contrastive/top1": min(1.0, 0.01 * s),
             "route/reason_frac": 0.75, "optim/lr": 1e-3 * min(1.0, s / 10)}
      f.write(json.dumps({k: v for k, v in row.items() if k not in skip}) + "\n")


def assert_png(path):
  assert os.path.isfile(path) and os.path.getsize(path) > 0
  with Image.open(path) as im:
    assert im.format == "PNG"
    assert im.size[0] > 100 and im.size[1] > 100
    im.verify()


def test_one_run_gives_curves_png(tmp_path):
  run = str(tmp_path / "run")
  write_metrics(run, range(5, 55, 5))
  assert plot.plot(run) == [os.path.join(run, "curves.png")]
  assert_png(os.path.join(run, "curves.png"))


def test_sweep_folder_gives_one_comparison_png(tmp_path):
  write_metrics(str(tmp_path / "lambda_gen_0p0"), range(1, 11), scale=1.0)
  write_metrics(str(tmp_path / "lambda_gen_1p0"), range(1, 11), scale=1.2)
  # A variant that never logged a metric still plots; a subfolder without metrics is ignored.
  write_metrics(str(tmp_path / "direct"), range(1, 6), skip=("route/reason_frac",))
  os.makedirs(tmp_path / "not_a_run")
  assert curves.find_runs(str(tmp_path)) == ["direct", "lambda_gen_0p0", "lambda_gen_1p0"]
  written = plot.plot(str(tmp_path))
  assert written == [os.path.join(tmp_path, "sweep.png")]
  assert_png(written[0])
  assert not os.path.exists(tmp_path / "direct" / "curves.png")
  written = plot.plot(str(tmp_path), per_run=True)
  assert len(written) == 4
  for path in written:
    assert_png(path)


def test_sweep_order_follows_summary_json(tmp_path):
  for name in ("b", "a", "c"):
    write_metrics(str(tmp_path / name), (1, 2))
  (tmp_path / "summary.json").write_text(json.dumps({"variants": [{"name": "c"}, {"name": "a"}]}))
  assert curves.find_runs(str(tmp_path)) == ["c", "a", "b"]


def test_resumed_log_keeps_one_row_per_step(tmp_path):
  run = tmp_path / "run"
  os.makedirs(run)
  rows = [{"step": 1, "loss/total": 3.0}, {"step": 2, "loss/total": 2.0},
          {"step": 2, "loss/total": 2.5}, {"step": 3, "loss/total": 1.0}]
  torn = '{"step": 4, "lo'  # A run killed mid-write.
  (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)
  got = curves.read_metrics(str(run))
  assert [(r["step"], r["loss/total"]) for r in got] == [(1, 3.0), (2, 2.5), (3, 1.0)]
  assert curves.final_row(str(run))["step"] == 3


def test_missing_metrics_names_the_path(tmp_path):
  missing = os.path.join(tmp_path, "metrics.jsonl")
  with pytest.raises(FileNotFoundError, match=re.escape(missing)):
    plot.plot(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=re.escape(missing)):
    plot.plot_run(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=re.escape(missing)):
    curves.read_metrics(str(tmp_path))
  assert curves.final_row(str(tmp_path)) is None
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-m", "trace_jax.tools.plot", f"--workdir={tmp_path}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert f"no metrics file at {missing}" in proc.stderr
  assert "Traceback" not in proc.stderr
