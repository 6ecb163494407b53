"""`configs/sweeps/*.py` and `tools/sweep`: every shipped variant applies to the demo config, the
dry run prints the right commands, skipping/summaries/failures on a fake trainer, and one real
two-variant sweep of the tiny demo that writes both summaries and resumes by skipping."""

import functools
import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest

from configs import demo
from trace_jax.tools import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SWEEP_FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "sweeps", "*.py"))
                     if os.path.basename(p) != "__init__.py")
SWEEP_NAMES = [os.path.splitext(os.path.basename(p))[0] for p in SWEEP_FILES]
DEMO = os.path.join(ROOT, "configs", "demo.py")


def env():
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # main sets its devices.


def cli(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "trace_jax.tools.sweep", *args], cwd=ROOT,
                        env=env(), capture_output=True, text=True, timeout=timeout)


def write_sweep(path, variants):
  path.write_text(f"def get_sweep():\n  return {variants!r}\n")
  return str(path)


def test_paper_ablations_are_shipped():
  assert {"lambda_gen", "lora", "readout", "training_data", "candidate_side",
          "hard_negatives"} <= set(SWEEP_NAMES)
  by_name = {n: sweep.load_sweep(p) for n, p in zip(SWEEP_NAMES, SWEEP_FILES)}
  assert [v["loss.lambda_gen"] for v in by_name["lambda_gen"]] == [0.0, 0.5, 1.0, 2.0]
  assert [(v["lora.rank"], v["lora.alpha"]) for v in by_name["lora"]] == [
    (16, 32), (32, 64), (128, 256), (128, 512), (256, 512)]
  readouts = [v["loss.readout"] for v in by_name["readout"]]
  assert readouts == ["pre_token", "emb", "end_of_reasoning"]
  assert [v["data.reasoning_marker"] for v in by_name["readout"]] == [False, False, True]
  sides = [v["data.cand_target"] for v in by_name["candidate_side"]]
  assert sides == ["none", "answer", "full"]
  modes = [v["data.hard_negatives"] for v in by_name["hard_negatives"]]
  assert modes == ["none", "listed", "pool"]
  targets = [(v["data.target"], v["loss.lambda_gen"]) for v in by_name["training_data"]]
  assert targets == [("direct", 0.0), ("answer", 1.0), ("reasoning", 1.0), ("full", 1.0)]


@pytest.mark.parametrize("path", SWEEP_FILES, ids=SWEEP_NAMES)
def test_every_variant_applies_to_the_demo_config(path):
  variants = sweep.load_sweep(path)
  assert len({v["name"] for v in variants}) == len(variants)
  for v in variants:
    overrides = sweep.overrides_of(v)
    # A locked ConfigDict refuses unknown keys and values of the wrong type.
    config = demo.get_config()
    config.lock()
    config.update_from_flattened_dict(overrides)
    # And the flags trace_jax.main will get parse back to the same values.
    parsed = sweep.resolve_config(DEMO, sweep.override_flags(overrides))
    for key, value in overrides.items():
      got = functools.reduce(getattr, key.split("."), parsed)
      want = functools.reduce(getattr, key.split("."), config)
      assert got == want == value and type(got) is type(want), (v["name"], key, got, want)


def test_typo_and_bad_sweeps_fail_before_anything_runs(tmp_path):
  typo = write_sweep(tmp_path / "typo.py", [{"name": "a", "loss.lamda_gen": 1.0}])
  with pytest.raises(ValueError, match="variant 'a'.*lamda_gen"):
    sweep.run_sweep(typo, DEMO, str(tmp_path / "out"), [], dry_run=True)
  with pytest.raises(ValueError, match="needs a 'name'"):
    sweep.load_sweep(write_sweep(tmp_path / "noname.py", [{"loss.lambda_gen": 1.0}]))
  with pytest.raises(ValueError, match="repeats"):
    sweep.load_sweep(write_sweep(tmp_path / "dup.py", [{"name": "a", "seed": 1},
                                                       {"name": "a", "seed": 2}]))
  with pytest.raises(ValueError, match="overrides nothing"):
    sweep.load_sweep(write_sweep(tmp_path / "empty.py", [{"name": "a"}]))
  clash = write_sweep(tmp_path / "clash.py", [{"name": "a", "seed": 1}])
  with pytest.raises(ValueError, match="--extra sets"):
    sweep.run_sweep(clash, DEMO, str(tmp_path / "out"), ["--config.seed=3"], dry_run=True)
  assert not os.path.exists(tmp_path / "out")


def test_dry_run_prints_one_command_per_variant(tmp_path):
  path = os.path.join(ROOT, "configs", "sweeps", "lora.py")
  workdir = str(tmp_path / "lora")
  proc = cli(f"--sweep={path}", "--config=configs/demo.py:steps=7,backbone=none",
             f"--workdir={workdir}",
             "--dry_run", "--extra=--config.log.every_steps=1 --config.data.root=/x")
  assert proc.returncode == 0, proc.stderr
  lines = [line for line in proc.stdout.splitlines() if "trace_jax.main" in line]
  variants = sweep.load_sweep(path)
  assert len(lines) == len(variants)
  for line, v in zip(lines, variants):
    args = line.split()
    assert args[1:3] == ["-m", "trace_jax.main"]
    assert "--config=configs/demo.py:steps=7,backbone=none" in args
    assert f"--workdir={os.path.join(workdir, v['name'])}" in args
    assert "--config.log.every_steps=1" in args and "--config.data.root=/x" in args
    assert f"--config.lora.rank={v['lora.rank']}" in args
    assert f"--config.lora.alpha={v['lora.alpha']!r}" in args
  assert not os.path.exists(workdir), "a dry run writes nothing"


FAKE_MAIN = textwrap.dedent("""
  import json, os, sys
  workdir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))
  if any(a == "--config.seed=13" for a in sys.argv):
    print("fake failure"); sys.exit(3)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    for step in (1, 2):
      f.write(json.dumps({"step": step, "loss/total": 10.0 - step}) + "\\n")
  with open(os.path.join(os.path.dirname(workdir), "ran.txt"), "a") as f:
    f.write(os.path.basename(workdir) + "\\n")
""")


@pytest.fixture
def fake_main(monkeypatch, tmp_path):
  """`tools/sweep` with trace_jax.main replaced by a script that logs steps 1 and 2 (or fails
  for seed 13) in a blink."""
  script = tmp_path / "fake_main.py"
  script.write_text(FAKE_MAIN)
  real = sweep.command

  def command(config_spec, workdir, extra, overrides):
    return [sys.executable, str(script), *real(config_spec, workdir, extra, overrides)[3:]]
  monkeypatch.setattr(sweep, "command", command)


def test_skips_finished_variants_and_reports_failures(tmp_path, fake_main, capsys):
  del fake_main
  path = write_sweep(tmp_path / "s.py", [{"name": "ok", "seed": 1}, {"name": "bad", "seed": 13},
                                         {"name": "ok2", "seed": 2}])
  out = tmp_path / "out"
  # A run cut off before its final step is rerun, not skipped.
  os.makedirs(out / "ok2")
  (out / "ok2" / "metrics.jsonl").write_text('{"step": 1, "loss/total": 9.5}\n')
  results = sweep.run_sweep(path, f"{DEMO}:steps=2", str(out), [])
  assert [r["status"] for r in results] == ["ran", "failed", "ran"]
  assert results[1]["returncode"] == 3
  assert "fake failure" in (out / "bad" / "train.log").read_text()
  assert (out / "ran.txt").read_text().split() == ["ok", "ok2"]
  summary = json.loads((out / "summary.json").read_text())
  assert [v["final"]["loss/total"] if v["final"] else None for v in summary["variants"]] == [
    8.0, None, 8.0]
  md = (out / "summary.md").read_text()
  assert "| ok | ran | 2 | 1 | 8 |" in md and "| bad | failed |" in md
  assert md.split("# Sweep", 1)[1].split("\n\n", 1)[1] in capsys.readouterr().out

  results = sweep.run_sweep(path, f"{DEMO}:steps=2", str(out), [])
  assert [r["status"] for r in results] == ["finished", "failed", "finished"]
  assert (out / "ran.txt").read_text().split() == ["ok", "ok2"], "finished variants rerun"
  # More steps asked: the same variants are no longer finished.
  results = sweep.run_sweep(path, f"{DEMO}:steps=2", str(out), ["--config.total_steps=5"],
                            dry_run=True)
  assert [r["status"] for r in results] == ["dry_run"] * 3


def test_failed_variant_fails_the_command_after_the_others(tmp_path):
  """The command-line exit status and message, with the fake trainer patched in a subprocess."""
  (tmp_path / "fake_main.py").write_text(FAKE_MAIN)
  path = write_sweep(tmp_path / "s.py", [{"name": "bad", "seed": 13}, {"name": "ok", "seed": 1}])
  code = textwrap.dedent(f"""
    import sys
    from absl import app
    from trace_jax.tools import sweep
    real = sweep.command
    sweep.command = lambda *a: [sys.executable, {str(tmp_path / "fake_main.py")!r}, *real(*a)[3:]]
    sweep._define_flags()
    app.run(sweep.main, argv=["sweep", "--sweep={path}", "--config={DEMO}:steps=2",
                              "--workdir={tmp_path / 'out'}"])
  """)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr
  assert "FAILED: variant bad (exit code 3)" in proc.stderr
  assert (tmp_path / "out" / "ok" / "metrics.jsonl").exists(), "the others still ran"
  assert (tmp_path / "out" / "summary.md").exists()


def test_real_two_variant_sweep_of_the_tiny_demo(tmp_path):
  """Two variants of training_data.py (direct_only, full) on a 48-query world, 2 steps each."""
  path = str(tmp_path / "two.py")
  with open(path, "w") as f:
    f.write("def get_sweep():\n  return [\n"
            "    {'name': 'direct_only', 'data.target': 'direct', 'loss.lambda_gen': 0.0},\n"
            "    {'name': 'full', 'data.target': 'full', 'loss.lambda_gen': 1.0},\n  ]\n")
  workdir = tmp_path / "sweep"
  extra = (f"--config.total_steps=2 --config.data.root={tmp_path / 'world'} "
           "--config.data.world_train=48 --config.data.world_test=8 --config.data.global_batch=16 "
           "--config.log.every_steps=1 --config.ckpt.every_steps=2 "
           # The sweep's machinery is under test, not evaluation (tests/eval): 2 x ~4 min less.
           "--config.eval.after_train=False")
  args = (f"--sweep={path}", "--config=configs/demo.py:backbone=none", f"--workdir={workdir}",
          f"--extra={extra}")
  proc = cli(*args, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert [v["name"] for v in summary["variants"]] == ["direct_only", "full"]
  for v in summary["variants"]:
    assert v["status"] == "ran"
    assert v["final"]["step"] == 2 and v["final"]["loss/total"] > 0
  direct, full = (v["final"] for v in summary["variants"])
  assert direct["route/reason_frac"] == 0.0
  assert full["route/reason_frac"] > 0.0
  md = (workdir / "summary.md").read_text()
  assert "loss/total" in md and "| direct_only | ran | 2 |" in md and "| full | ran | 2 |" in md

  rerun = cli(*args)
  assert rerun.returncode == 0, rerun.stderr
  assert rerun.stdout.count("skipped") == 2 and "step 1/2" not in rerun.stdout
  summary = json.loads((workdir / "summary.json").read_text())
  assert [v["status"] for v in summary["variants"]] == ["finished", "finished"]
  assert summary["variants"][0]["final"]["loss/total"] == direct["loss/total"]
