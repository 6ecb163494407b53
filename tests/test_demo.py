"""The README's first command, shortened: `trace_jax.main` on configs/demo.py generates the world,
pretrains the backbone and says so, fine-tunes it (the loss falls), checkpoints, evaluates with
the adaptive encoder, prints the summary and writes the plots. The full-length numbers are in the
README (they take minutes, not a test)."""

import json
import os
import subprocess
import sys

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("synthetic_task0", "synthetic_task3", "synthetic_task6", "synthetic_task7")


def test_demo_runs_every_stage(tmp_path):
  world, workdir = str(tmp_path / "world"), str(tmp_path / "run")
  hf_dir = str(tmp_path / "backbone" / "hf")
  cmd = [sys.executable, "-m", "trace_jax.main",
         "--config=configs/demo.py:steps=40,backbone_steps=10",
         f"--config.backbone.workdir={tmp_path / 'backbone'}", f"--config.backbone.hf_dir={hf_dir}",
         "--config.backbone.config.data.global_batch=16",
         f"--workdir={workdir}", f"--config.data.root={world}", "--config.data.world_train=640",
         "--config.data.world_test=8", "--config.data.global_batch=16",
         "--config.optim.warmup_steps=5", "--config.log.every_steps=5",
         "--config.ckpt.every_steps=20", "--config.eval.qps_queries=4",
         "--config.eval.qps_rounds=1", "--config.eval.max_new_tokens=8"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # main sets its devices.
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]

  assert os.path.isfile(os.path.join(world, "world.json"))
  assert f"backbone: building {hf_dir}" in proc.stdout
  assert os.path.isfile(os.path.join(hf_dir, "config.json"))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["ckpt"]["init_from"] == hf_dir
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 8
  # LoRA on a 10-step backbone: retrieval is learnt within 40 steps, the LM loss barely moves.
  ret, lm = ([r[f"loss/{k}"] for r in rows] for k in ("contrastive", "lm"))
  assert sum(ret[-2:]) < 0.8 * sum(ret[:2]), ret
  assert sum(lm[-2:]) < sum(lm[:2]), lm
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
