"""The README's main command runs end to end (today: one sharded forward pass of the demo model)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_demo_forward(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # main sets its own devices.
  proc = subprocess.run(
    [sys.executable, "-m", "trace_jax.main", "--config=configs/demo.py",
     f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "forward.json") as f:
    summary = json.load(f)
  assert summary["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert summary["logits_finite"]
  assert summary["logits_shape"][-1] == 512 and summary["parameters"] > 500_000
