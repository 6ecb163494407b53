"""The teacher end to end on the demo world: a briefly trained demo run as teacher (its text is
poor; this proves the plumbing) -> assess, generate, verify -> the raw M-BEIR-CoT file ->
build_cot -> a training run reads it. A run killed mid-write resumes to the same records, two
processes give one process's records, and bad queries stop or are counted."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from configs import demo
from configs import teach as teach_config
from trace_jax.data import cot
from trace_jax.teach import phases, runner, shards
from trace_jax.teach.items import TeachItem, load_items, sample_items
from trace_jax.teach.loading import load_teacher
from trace_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small_demo(tmp, steps=2):
  config = demo.get_config(f"steps={steps},backbone=none")
  config.data.root = str(tmp / "world")
  config.data.world_train, config.data.world_test = 48, 8
  config.data.global_batch = 16
  return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A demo run trained for 2 steps, with its config saved as trace_jax.main saves it."""
  tmp = tmp_path_factory.mktemp("teach")
  config = small_demo(tmp)
  workdir = str(tmp / "run")
  loop.run(config, workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  return config, workdir


def teach_cfg(**generate):
  config = teach_config.get_config("world=demo")
  config.generate.max_new_tokens = 10
  config.generate.update(generate)
  return config


def all_phases(config, workdir, root, out):
  items = load_items(root, config.files)
  teacher = load_teacher(workdir, config, root)
  phases.assess(config, None, items, out)
  phases.generate(config, teacher, items, out)
  phases.verify(config, teacher, items, out)
  return items, phases.merge(items, out)


def raw_records(out):
  with open(os.path.join(out, phases.RAW_FILE)) as f:
    return [json.loads(line) for line in f]


# Confidences are softmaxes of a float32 prefill whose batches are composed (and padded to
# buckets) differently in one process and in two, or before and after a kill: XLA's reductions
# then differ in their last bits (seen: 0.472276 vs 0.472275). 1e-4 is far above that noise and
# far below what a wrong prompt or a wrong answer changes.
CONFIDENCE_ATOL = 1e-4


def assert_same_records(got, want):
  """Same queries, routes and texts exactly; confidences within `CONFIDENCE_ATOL`."""
  strip = lambda rs: [{k: v for k, v in r.items() if k != "confidence"} for r in rs]  # noqa
  assert strip(got) == strip(want)
  for g, w in zip(got, want):
    assert ("confidence" in g) == ("confidence" in w), g["qid"]
    if "confidence" in w:
      assert g["confidence"] == pytest.approx(w["confidence"], abs=CONFIDENCE_ATOL), g["qid"]


def test_all_phases_then_build_cot_then_training_reads_it(run, tmp_path):
  config, workdir = run
  root = config.data.root
  out = str(tmp_path / "teach")
  items, report = all_phases(teach_cfg(), workdir, root, out)
  raw = raw_records(out)
  hard = [it for it in items if it.task_id in (6, 7)]
  assert report["reason"] == len(hard) and report["direct"] == len(items) - len(hard) > 0
  assert [r["qid"] for r in raw] == [it.qid for it in items]  # Every query, in file order.
  for r in raw:
    if r["route"] == "reason":
      assert r["teacher_output"].startswith("<reasoning>") and 0 <= r["confidence"] <= 1
    else:
      assert r["teacher_output"] is None and "confidence" not in r
  assert report["verified"] == len(hard)
  cot.read_cot(os.path.join(out, phases.RAW_FILE))  # build_cot's reader takes it as it is.
  # --phase=merge alone, with no teacher to load, writes the same file and report.
  merged = raw_records(out)
  os.remove(os.path.join(out, phases.RAW_FILE))
  assert runner.run(teach_cfg(), "merge", None, None, root, out) == report
  assert raw_records(out) == merged
  with pytest.raises(ValueError, match="--phase=generate needs --teacher"):
    runner.run(teach_cfg(), "generate", None, None, root, out)

  built = str(tmp_path / "cot.jsonl")
  files = [os.path.join(root, q) for q, _ in config.data.train_files]
  pools = [os.path.join(root, p) for _, p in config.data.train_files]
  cmd = [sys.executable, "-m", "trace_jax.tools.build_cot", f"--in={out}/{phases.RAW_FILE}",
         f"--queries={','.join(files)}", f"--pool={','.join(pools)}", f"--out={built}",
         "--min_reasoning_tokens=1", "--min_answer_tokens=1", "--min_confidence=0"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"read {len(items)} records" in proc.stdout
  kept = cot.read_cot(built)
  assert sum(r.route == "direct" for r in kept.values()) == len(items) - len(hard)

  train = small_demo(tmp_path, steps=1)
  train.data.root = root
  train.data.cot_file = os.path.relpath(built, root)
  train.data.cot_missing = "drop"  # The queries build_cot dropped are not trained on.
  train.eval.after_train = False
  row = loop.run(train, str(tmp_path / "student"))
  assert row["step"] == 1 and row["loss/total"] > 0


def test_resume_after_a_kill_gives_the_same_records(run, tmp_path):
  """SIGKILL while generating; the rerun neither redoes nor duplicates a query and ends with
  the records of an uninterrupted run (greedy decoding)."""
  config, workdir = run
  root = config.data.root
  whole = str(tmp_path / "whole")
  all_phases(teach_cfg(slots=2, batch_size=2), workdir, root, whole)

  out = str(tmp_path / "killed")
  cmd = [sys.executable, "-m", "trace_jax.tools.teach", "--config=configs/teach.py:world=demo",
         f"--teacher={workdir}", f"--mbeir_root={root}", f"--out={out}",
         "--config.generate.max_new_tokens=10", "--config.generate.slots=2",
         "--config.generate.batch_size=2", "--config.progress_seconds=0"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if sum(1 for _ in shards.read(out, "generated")) >= 2:
      break
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  done_before = sum(1 for _ in shards.read(out, "generated"))
  rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  generated = [r["qid"] for r in shards.read(out, "generated")]
  assert len(generated) == len(set(generated)) >= done_before
  assert_same_records(raw_records(out), raw_records(whole))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_give_one_processs_records(run, tmp_path):
  config, workdir = run
  root = config.data.root
  one = str(tmp_path / "one")
  all_phases(teach_cfg(), workdir, root, one)
  out = str(tmp_path / "two")
  port = _free_port()
  env = dict({k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen(
    [sys.executable, "-m", "trace_jax.tools.teach", "--config=configs/teach.py:world=demo",
     f"--teacher={workdir}", f"--mbeir_root={root}", f"--out={out}",
     "--config.generate.max_new_tokens=10", f"--coordinator_address=127.0.0.1:{port}",
     "--num_processes=2", f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
    stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert sorted(os.path.basename(p) for p in shards.shard_paths(out, "generated")) == [
    "generated.p0of2.jsonl", "generated.p1of2.jsonl"]
  assert_same_records(raw_records(out), raw_records(one))


def test_bad_queries_stop_or_are_counted(run, tmp_path):
  config, workdir = run
  root = str(tmp_path / "world")
  shutil.copytree(config.data.root, root)
  items = load_items(root, teach_cfg().files)
  victim = next(it for it in items if it.task_id == 7)
  os.remove(os.path.join(root, victim.query_image))
  with pytest.raises(phases.BadItem, match=rf"{victim.where} \(query {victim.qid}\): image not"):
    all_phases(teach_cfg(), workdir, root, str(tmp_path / "strict"))
  lenient = teach_cfg()
  lenient.data.on_bad_example = "skip"
  _, report = all_phases(lenient, workdir, root, str(tmp_path / "lenient"))
  assert report["skipped"] >= 1
  assert victim.qid not in {r["qid"] for r in raw_records(str(tmp_path / "lenient"))}


def test_record_comparison_fails_on_a_wrong_text_or_a_confidence_past_the_tolerance():
  want = [{"qid": "1:1", "route": "reason", "teacher_output": "<answer>a</answer>",
           "confidence": 0.472276}]
  assert_same_records([dict(want[0], confidence=0.472275)], want)  # The noise seen.
  for bad in (dict(want[0], teacher_output="<answer>b</answer>"), dict(want[0], route="direct"),
              dict(want[0], confidence=0.472276 + 2 * CONFIDENCE_ATOL)):
    with pytest.raises(AssertionError):
      assert_same_records([bad], want)
  with pytest.raises(AssertionError):
    assert_same_records([{k: v for k, v in want[0].items() if k != "confidence"}], want)


class _Loaded(Exception):
  """Raised by the fake `load_hf`: what the teacher was loaded with is all this test needs."""


def test_hf_teacher_and_its_aot_compile_use_the_configured_dtypes(tmp_path, monkeypatch):
  from configs import qwen2_5_vl_72b
  from trace_jax.teach import loading
  from trace_jax.tools import aot_compile
  (tmp_path / "config.json").write_text("{}")
  seen = {}

  def fake_load_hf(path, **kw):
    seen.update(kw)
    raise _Loaded()

  monkeypatch.setattr(loading, "load_hf", fake_load_hf)
  for arg in ("teacher=72b", "teacher=7b"):
    config = teach_config.get_config(arg)
    assert (config.dtype, config.param_dtype) == ("bfloat16", "bfloat16")
    with pytest.raises(_Loaded):
      load_teacher(str(tmp_path), config, str(tmp_path))
    assert (seen["dtype"], seen["param_dtype"]) == ("bfloat16", "bfloat16")
  model = qwen2_5_vl_72b.get_config("param_dtype=float32")
  aot = aot_compile.with_teacher_dtypes(model, teach_config.get_config("teacher=72b"))
  assert (aot.model.dtype, aot.model.param_dtype) == ("bfloat16", "bfloat16")
  assert model.model.param_dtype == "float32"  # The model config itself is left alone.


def test_max_queries_is_a_seeded_sample_across_datasets_in_file_order():
  items = [TeachItem(f"{d}:{i}", 0, name, f"q.jsonl:{n}", "", "", None, "", None)
           for n, (d, name, i) in enumerate(
             [(9, "VisualNews", i) for i in range(60)] + [(8, "CIRR", i) for i in range(40)])]
  sample = sample_items(items, 20, seed=0)
  assert len(sample) == 20 and len({it.qid for it in sample}) == 20
  assert {it.dataset for it in sample} == {"VisualNews", "CIRR"}  # Not the first 20.
  assert sample == sorted(sample, key=items.index)  # File order.
  assert sample_items(items, 20, seed=0) == sample  # The same draw in every process.
  assert sample_items(items, 20, seed=1) != sample
  assert sample_items(items, 0, seed=0) == items == sample_items(items, 500, seed=0)
