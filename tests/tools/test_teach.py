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


@pytest.fixture(scope="module")
def whole(run, tmp_path_factory):
  """(items, report, output folder) of one uninterrupted in-process run of every phase."""
  config, workdir = run
  out = str(tmp_path_factory.mktemp("whole") / "teach")
  items, report = all_phases(teach_cfg(), workdir, config.data.root, out)
  return items, report, out


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


def test_all_phases_then_build_cot_then_training_reads_it(run, whole, tmp_path):
  config, workdir = run
  root = config.data.root
  items, report, out = whole
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


def test_resume_after_a_kill_gives_the_same_records(run, whole, tmp_path):
  """SIGKILL while generating (2 slots, batches of 2); the rerun neither redoes nor duplicates
  a query and ends with the records of an uninterrupted run with the default slots and batches
  (greedy decoding: the texts do not depend on the batch layout)."""
  config, workdir = run
  root = config.data.root

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
  assert_same_records(raw_records(out), raw_records(whole[2]))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_give_one_processs_records(run, tmp_path):
  """With sampling and every output rejected (min_confidence=1), each reason query of a seeded
  24-query sample is retried once; two processes draw the same sample and write one process's
  attempts and records."""
  config, workdir = run
  root = config.data.root
  one = str(tmp_path / "one")
  retry = {"generate.temperature": 0.7, "min_confidence": 1.0, "max_attempts": 2,
           "max_queries": 24}
  cfg = teach_cfg()
  for key, value in retry.items():
    section, _, field = key.rpartition(".")
    setattr(cfg[section] if section else cfg, field, value)
  report = runner.run(cfg, "all", workdir, None, root, one)
  assert report["queries"] == 24 and report["retried"] == report["reason"] > 0
  assert report["attempts"] == {"2": report["reason"]}
  out = str(tmp_path / "two")
  port = _free_port()
  env = dict({k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen(
    [sys.executable, "-m", "trace_jax.tools.teach", "--config=configs/teach.py:world=demo",
     f"--teacher={workdir}", f"--mbeir_root={root}", f"--out={out}",
     "--config.generate.max_new_tokens=10", *[f"--config.{k}={v}" for k, v in retry.items()],
     f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for i in range(2)]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert sorted(os.path.basename(p) for p in shards.shard_paths(out, "generated")) == [
    "generated.p0of2.jsonl", "generated.p1of2.jsonl"]
  assert_same_records(raw_records(out), raw_records(one))
  texts = lambda d: sorted((r["qid"], r["attempt"], r["teacher_output"])  # noqa: E731
                           for r in shards.read(d, "generated"))
  assert texts(out) == texts(one)  # Every attempt, not only the kept one.


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


def test_items_leave_their_positives_texts_in_the_pool(tmp_path):
  """Passages of 40 KB as positives: the items hold where each is (a few bytes), not the text,
  and read it back exact when a prompt asks."""
  import tracemalloc
  root = tmp_path / "mbeir"
  shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "mbeir_mini"), root)
  pool = root / "cand_pool" / "global" / "mbeir_union_train_cand_pool.jsonl"
  records = [json.loads(line) for line in pool.read_text().splitlines()]
  texts = {}
  for r in records:
    if r["txt"]:
      r["txt"] = texts[r["did"]] = f"{r['did']} " + "passage " * 5000
  pool.write_text("".join(json.dumps(r) + "\n" for r in records))
  files = [("query/union_train/mbeir_union_up_train.jsonl",
            "cand_pool/global/mbeir_union_train_cand_pool.jsonl")]
  tracemalloc.start()
  items = load_items(str(root), files)
  held, _ = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  with_text = [it for it in items if it.target_text]
  assert with_text and held < sum(len(it.target_text) for it in with_text) / 4
  for it in with_text:
    assert it.target_text == it.resolved().target == texts[it.target_text.split()[0]]


@pytest.mark.parametrize("tail", ["", '{"qid": "9:', '{"qid": "' + "x" * 70000])
def test_a_shard_loses_only_its_partial_last_line(tmp_path, tail):
  """A kill mid-write leaves a partial line, here also one longer than the block the cut reads
  backwards; the next run's shard cuts it and keeps every complete record."""
  lines = [json.dumps({"qid": f"9:{i}", "text": "y" * (i * 5000)}) + "\n" for i in range(30)]
  path = tmp_path / "generated.p0of1.jsonl"
  path.write_text("".join(lines) + tail)
  shards.Shard(str(tmp_path), "generated").close()
  assert path.read_text() == "".join(lines)
  path.write_text(tail)
  shards.Shard(str(tmp_path), "generated").close()
  assert path.read_text() == ""


def _item(qid, dataset="CIRR", target="", query=""):
  return TeachItem(qid, 7, dataset, f"q.jsonl:{qid}", "Find it.", query, None, target, None)


def _write_shard(out, phase, records):
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"{phase}.p0of1.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


GOOD = "<reasoning>a red dress made navy</reasoning><answer>a navy dress</answer>"


def test_retries_merge_the_accepted_attempt_and_count_attempts_and_cuts(tmp_path):
  """Hand-written shards: q1 rejected then accepted; q2 malformed, then twice below the
  threshold (all attempts used: the last is kept); q3 accepted at once, its prompt cut; q4 not
  verified yet; q5 rejected once with attempts left."""
  from trace_jax.teach import attempts
  out = str(tmp_path)
  items = [_item(f"8:{i}") for i in range(1, 6)]
  _write_shard(out, "routes", [{"qid": it.qid, "task_id": 7, "route": "reason"} for it in items])
  gen = [("8:1", 0, GOOD), ("8:1", 1, GOOD.replace("navy", "blue")), ("8:2", 0, "no tags"),
         ("8:2", 1, GOOD), ("8:2", 2, GOOD.replace("navy", "teal")), ("8:3", 0, GOOD),
         ("8:4", 0, GOOD), ("8:5", 0, GOOD)]
  _write_shard(out, "generated", [dict({"qid": q, "task_id": 7, "route": "reason", "attempt": a,
                                        "teacher_output": t}, **({"cut": {"target": 40}}
                                                                 if q == "8:3" else {}))
                                  for q, a, t in gen])
  conf = [("8:1", 0, 0.3), ("8:1", 1, 0.9), ("8:2", 0, 0.95), ("8:2", 1, 0.2), ("8:2", 2, 0.5),
          ("8:3", 0, 0.8), ("8:5", 0, 0.7)]
  _write_shard(out, "verified", [{"qid": q, "attempt": a, "confidence": c} for q, a, c in conf])
  config = teach_cfg(temperature=0.7)
  assert (config.max_attempts, config.min_confidence) == (3, 0.7)
  assert attempts.next_attempts(config, out, items) == {"8:4": 0, "8:5": 1}
  config.generate.temperature = 0.0  # Greedy: one attempt, nothing retried.
  assert attempts.next_attempts(config, out, items) == {"8:4": 0}
  report = phases.merge(items, out, min_confidence=0.7)
  raw = {r["qid"]: r for r in raw_records(out)}
  assert raw["8:1"]["teacher_output"] == gen[1][2] and raw["8:1"]["confidence"] == 0.9
  assert raw["8:2"]["teacher_output"] == gen[4][2] and raw["8:2"]["confidence"] == 0.5
  assert "confidence" not in raw["8:4"] and raw["8:5"]["confidence"] == 0.7
  assert report["retried"] == 2 and report["attempts"] == {"1": 3, "2": 1, "3": 1}
  assert report["accepted"] == 2 and report["verified"] == 4
  assert report["prompt_cuts"]["generate"] == {"queries": 1, "tokens": {"target": 40},
                                               "qids": ["8:3"]}
  assert report["prompt_cuts"]["verify"]["queries"] == 0


def test_prompt_budget_cuts_the_target_then_the_query(run, tmp_path):
  """A knowledge verifier prompt with a positive text far past the bucket: its {target} is cut
  to fit (head, image, instruction, answer and fixed text whole) and the cut recorded; a bucket
  too small even for empty fields stays a bad example."""
  import dataclasses
  from trace_jax.teach.prompting import Template, chat_ids
  config, workdir = run
  teacher = dataclasses.replace(load_teacher(workdir, teach_cfg(), config.data.root),
                                output_format="tagged")
  template = Template(**teach_config.VERIFY_KNOWLEDGE)
  long = _item("5:1", target="the red dress on the grass " * 200, query="what is it")
  cuts = {}
  ids, _, _ = phases._prompt(teacher, template, long, (256,), "a red dress", prefixed=False,
                             cuts=cuts)
  assert len(ids) <= 256 and 0 < cuts["5:1"]["target"] and "query" not in cuts["5:1"]
  head, _ = chat_ids(teacher.tok, template.head, 0, "")
  assert ids[:len(head) - 5] == head[:len(head) - 5]  # The system turn and head are whole.
  text = teacher.tok.decode(ids)
  assert "a red dress" in text and "Is the proposed answer correct?" in text
  assert text.count("dress") < 200  # The target was cut.
  with pytest.raises(phases.BadItem, match="longer than the largest bucket 40 even with its "
                                           "target and query text cut to nothing"):
    phases._prompt(teacher, template, long, (40,), "a red dress", prefixed=False, cuts={})


class _Words:
  """Whitespace words as tokens (enough for the budget's arithmetic)."""

  def encode(self, text):
    return text.split()

  def decode(self, ids):
    return " ".join(ids)


def test_fit_fields_cuts_the_target_first_then_the_query():
  from trace_jax.teach.prompting import fit_fields
  it = _item("8:1", target="t " * 30, query="q " * 10)
  length = lambda x: 5 + len(x.query_text.split()) + len(x.target_text.split())  # noqa: E731
  cut, cuts = fit_fields(_Words(), it, length, 25, ("target", "query"))
  assert cuts == {"target": 20} and cut.query_text == it.query_text and length(cut) == 25
  cut, cuts = fit_fields(_Words(), it, length, 10, ("target", "query"))
  assert cuts == {"target": 30, "query": 5} and cut.target_text == "" and length(cut) == 10
  cut, cuts = fit_fields(_Words(), it, length, 10, ("query",))  # A template without {target}.
  assert cuts == {"query": 10} and length(cut) > 10  # Still too long: the caller says so.
  assert fit_fields(_Words(), it, length, 100, ("target", "query")) == (it, {})
