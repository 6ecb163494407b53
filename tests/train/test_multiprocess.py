"""Two local processes with 4 fake devices each: the same losses as one process with 8, and a
SIGTERM sent to one of them stops both at the same step with a checkpoint."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(world, workdir, *extra):
  return [sys.executable, "-m", "trace_jax.main", "--config=configs/demo.py:steps=3,backbone=none",
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


def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path):
  world, workdir = str(tmp_path / "world"), str(tmp_path / "run")
  env = dict({k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  port = _free_port()
  cmd = lambda i: [c.replace("steps=3", "steps=400") for c in _command(  # noqa: E731
    world, workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
    f"--process_id={i}", "--config.ckpt.every_steps=1000")]
  procs = [subprocess.Popen(cmd(i), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 600
  while not os.path.exists(metrics) and time.time() < deadline:
    assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)  # Only one process is told.
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  stopped = [int(out.split("saved a checkpoint at step ")[1].split(";")[0]) for out, _ in outs]
  assert stopped[0] == stopped[1] < 400
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(stopped[0])]
