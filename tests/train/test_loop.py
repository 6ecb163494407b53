"""The training loop on a small generated world: metrics, checkpoints, and a run killed with
SIGKILL and restarted reaching the same parameters bit for bit as an uninterrupted one."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def command(world: str, workdir: str) -> list[str]:
  return [sys.executable, "-m", "trace_jax.main", "--config=configs/demo.py:steps=6,backbone=none",
          f"--workdir={workdir}", f"--config.data.root={world}", "--config.data.world_train=48",
          "--config.data.world_test=8", "--config.data.global_batch=16",
          "--config.optim.warmup_steps=0", "--config.log.every_steps=2",
          "--config.ckpt.every_steps=2", "--config.log.profile_steps=(2,4)",
          "--config.eval.after_train=False"]


def env():
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # main sets its devices.


def rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def params(workdir, step):
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  root = tmp_path_factory.mktemp("loop")
  world, workdir = str(root / "world"), str(root / "run")
  proc = subprocess.run(command(world, workdir), cwd=ROOT, env=env(), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return world, workdir


def test_metrics_and_checkpoints(uninterrupted):
  _, workdir = uninterrupted
  logged = rows(workdir)
  assert [r["step"] for r in logged] == [2, 4, 6]
  for key in ("loss/total", "loss/lm", "loss/contrastive", "contrastive/top1", "optim/lr",
              "route/reason_frac", "data/skipped_examples", "perf/tokens_per_s"):
    assert key in logged[-1]
  assert logged[-1]["loss/total"] < logged[0]["loss/total"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(name.startswith("events.out.tfevents") for name in events)
  assert os.listdir(os.path.join(workdir, "profile"))  # Steps 2 and 3 were traced.


def test_sigkill_and_restart_reach_the_same_parameters(uninterrupted, tmp_path):
  world, workdir = uninterrupted
  killed = str(tmp_path / "killed")
  proc = subprocess.Popen(command(world, killed), cwd=ROOT, env=env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first = os.path.join(killed, "checkpoints", "2")
  deadline = time.time() + 600
  while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  os.kill(proc.pid, signal.SIGKILL)  # Somewhere between step 2 and the end.
  proc.wait()
  restart = subprocess.run(command(world, killed), cwd=ROOT, env=env(), capture_output=True,
                           text=True, timeout=600)
  assert restart.returncode == 0, restart.stderr[-3000:]
  for a, b in zip(params(killed, 6), params(workdir, 6)):
    np.testing.assert_array_equal(a, b)


def test_sigterm_saves_and_exits_cleanly(uninterrupted, tmp_path):
  world, _ = uninterrupted
  workdir = str(tmp_path / "preempted")
  cmd = command(world, workdir)
  cmd[3] = "--config=configs/demo.py:steps=200,backbone=none"
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 600
  while not os.path.exists(metrics) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0
  assert "preempted: saved a checkpoint at step" in out
  saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))]
  assert saved and max(saved) < 200


def test_non_finite_loss_stops_without_saving(uninterrupted, tmp_path):
  world, _ = uninterrupted
  workdir = str(tmp_path / "nan")
  cmd = command(world, workdir) + ["--config.loss.temperature=1e-30",
                                   "--config.ckpt.every_steps=1"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode != 0
  assert "FloatingPointError: loss is" in proc.stderr and "at step 1" in proc.stderr
  ckpts = os.path.join(workdir, "checkpoints")
  assert not os.path.isdir(ckpts) or not os.listdir(ckpts)


def test_an_interrupted_save_leaves_the_previous_checkpoint_usable(uninterrupted, tmp_path):
  """A save cut off midway is a `<step>.orbax-checkpoint-tmp-*` folder: restarting ignores it,
  resumes from the last complete checkpoint and reaches the same parameters."""
  world, workdir = uninterrupted
  crashed = str(tmp_path / "crashed")
  shutil.copytree(workdir, crashed)
  ckpts = os.path.join(crashed, "checkpoints")
  shutil.rmtree(os.path.join(ckpts, "6"))
  os.rename(os.path.join(ckpts, "4"), os.path.join(ckpts, "4.orbax-checkpoint-tmp-1234"))
  for name in os.listdir(os.path.join(ckpts, "4.orbax-checkpoint-tmp-1234", "state")):
    path = os.path.join(ckpts, "4.orbax-checkpoint-tmp-1234", "state", name)
    if os.path.isfile(path):
      with open(path, "r+b") as f:  # Half-written files.
        f.truncate(os.path.getsize(path) // 2)
  restart = subprocess.run(command(world, crashed), cwd=ROOT, env=env(), capture_output=True,
                           text=True, timeout=600)
  assert restart.returncode == 0, restart.stderr[-3000:]
  assert "resumed from step 2" in restart.stderr + restart.stdout
  for a, b in zip(params(crashed, 6), params(workdir, 6)):
    np.testing.assert_array_equal(a, b)


def test_marker_readout_and_candidate_side_reasoning_train_and_evaluate(uninterrupted, tmp_path):
  """The readout and candidate-side ablations end to end: the end-of-reasoning readout with the
  `</think>` marker and candidates that learn the full teacher text, trained, then evaluated
  (candidates encoded by generation)."""
  world, plain = uninterrupted
  workdir = str(tmp_path / "ablations")
  cmd = command(world, workdir)
  cmd[3] = "--config=configs/demo.py:steps=2,backbone=none"
  cmd = [c for c in cmd if not c.startswith(("--config.eval.after_train", "--config.log.prof"))]
  cmd += ["--config.data.reasoning_marker=True", "--config.loss.readout=end_of_reasoning",
          "--config.data.cand_target=full", "--config.data.cand_len=80",
          "--config.eval.qps_queries=0", "--config.eval.max_new_tokens=4"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    results = json.load(f)
  assert results["step"] == 2 and len(results["tasks"]) == 4
  assert os.path.exists(os.path.join(world, "tokenizer_eor.model"))
  # The same batches as the plain run's first two steps, but every one of the 16 candidates
  # learns at least its <|emb|> too (and each reasoning query one marker more).
  base = rows(plain)[0]
  assert base["step"] == 2 and rows(workdir)[-1]["step"] == 2
  assert rows(workdir)[-1]["lm/target_tokens"] >= base["lm/target_tokens"] + 16


def test_skipped_examples_are_logged_with_their_reasons_and_counted(uninterrupted, tmp_path):
  """Training images removed from a copy of the world: under on_bad_example=skip every skipped
  example is logged with its file:line and qid, and metrics.jsonl counts them at each log step;
  over the allowed fraction, the run stops with an error naming the reasons."""
  world, _ = uninterrupted
  broken = str(tmp_path / "world")
  shutil.copytree(world, broken)
  images = os.path.join(broken, "mbeir_images", "synthetic_images", "train")
  for name in sorted(os.listdir(images))[::4]:  # A quarter of the training images.
    os.remove(os.path.join(images, name))
  workdir = str(tmp_path / "skip")
  cmd = command(broken, workdir) + ["--config.data.on_bad_example=skip",
                                    "--config.data.max_skip_fraction=0.9",
                                    "--config.data.skip_window=64"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  logged = [line for line in proc.stderr.splitlines() if "skipped bad example" in line]
  assert logged and all("_train.jsonl:" in line and "(query 10:" in line and "image not found"
                        in line for line in logged), logged[:3]
  counts = [r["data/skipped_examples"] for r in rows(workdir)]
  assert sum(counts) == len(logged) == rows(workdir)[-1]["data/skipped_total"]
  strict = subprocess.run(command(broken, str(tmp_path / "strict")) + [
    "--config.data.on_bad_example=skip", "--config.data.max_skip_fraction=0.01"],
    cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert strict.returncode != 0
  assert "TooManyBadExamplesError" in strict.stderr and "image not found" in strict.stderr
