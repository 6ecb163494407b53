"""The README's first command, shortened: `trace_jax.main` on configs/demo.py generates the world,
trains (the loss falls), checkpoints, evaluates with the adaptive encoder, prints the summary and
writes the plots. The full-length numbers are in the README (they take minutes, not a test)."""

import json
import os
import subprocess
import sys

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("synthetic_task0", "synthetic_task3", "synthetic_task6", "synthetic_task7")


def test_demo_runs_every_stage(tmp_path):
  world, workdir = str(tmp_path / "world"), str(tmp_path / "run")
  cmd = [sys.executable, "-m", "trace_jax.main", "--config=configs/demo.py:steps=40",
         f"--workdir={workdir}", f"--config.data.root={world}", "--config.data.world_train=640",
         "--config.data.world_test=8", "--config.data.global_batch=16",
         "--config.optim.warmup_steps=5", "--config.log.every_steps=5",
         "--config.ckpt.every_steps=20", "--config.eval.qps_queries=4",
         "--config.eval.qps_rounds=1", "--config.eval.max_new_tokens=8"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # main sets its devices.
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]

  assert os.path.isfile(os.path.join(world, "world.json"))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [json.loads(line)["loss/total"] for line in f]
  assert len(losses) == 8
  assert sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "40"]

  with open(os.path.join(workdir, "eval", "results.json")) as f:
    results = json.load(f)
  assert results["step"] == 40 and results["encoder_mode"] == "adaptive"
  assert set(results["tasks"]) == set(TASKS)
  for task in results["tasks"].values():
    assert 0 <= task["recall@1"] <= task["recall@5"] <= 1 and task["num_queries"] == 8
    assert set(task["qps"]) == {"adaptive", "direct", "always_reason"}
  assert set(results["qps"]) == {"adaptive", "direct", "always_reason"}
  for name in TASKS:
    assert name in proc.stdout  # The printed summary has one row per task.
  for png in ("curves.png", os.path.join("eval", "routing.png")):
    with Image.open(os.path.join(workdir, png)) as im:
      assert im.format == "PNG" and im.size[0] > 100
