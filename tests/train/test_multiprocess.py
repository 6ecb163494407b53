"""Two local processes with 4 fake devices each give the same losses as one process with 8."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(world, workdir, *extra):
  return [sys.executable, "-m", "trace_jax.main", "--config=configs/demo.py:steps=3",
          f"--workdir={workdir}", f"--config.data.root={world}", "--config.data.world_train=48",
          "--config.data.world_test=8", "--config.data.global_batch=16",
          "--config.data.data_shards=2", "--config.optim.warmup_steps=0",
          "--config.log.every_steps=1", "--config.ckpt.every_steps=3",
          "--config.eval.after_train=False", *extra]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss/total"] for line in f]


def test_two_processes_equal_one(tmp_path):
  world = str(tmp_path / "world")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  one = subprocess.run(_command(world, str(tmp_path / "one")), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  env4 = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  port = _free_port()
  procs = [subprocess.Popen(
    _command(world, str(tmp_path / "two"), f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2", f"--process_id={i}"),
    cwd=ROOT, env=env4, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  np.testing.assert_allclose(_losses(str(tmp_path / "two")), _losses(str(tmp_path / "one")),
                             rtol=1e-5)
  assert len(_losses(str(tmp_path / "one"))) == 3
