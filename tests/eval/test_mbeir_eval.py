"""`python -m trace_jax.eval` end to end on a briefly trained demo model: what it writes, the
union pool encoded once, a root holding only some tasks, seeded random instructions, two
processes giving one process's recalls; the model restored without its optimizer state, pool
embeddings renewed when the checkpoint is retrained, a stopped pool encoding resumed; and its
QPS timing."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import demo
from trace_jax.data import mbeir
from trace_jax.data import setup as data_setup
from trace_jax.eval import mbeir_eval, pools
from trace_jax.train import loop, trained as trained_lib
from tests.fixtures import MBEIR_MINI

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASKS = ("synthetic_task0", "synthetic_task7")


def small_config(tmp, steps=2):
  config = demo.get_config(f"steps={steps},backbone=none")
  config.data.root = str(tmp / "world")
  config.data.world_train, config.data.world_test = 48, 8
  config.data.global_batch = 16
  config.eval.tasks = TASKS
  config.eval.max_new_tokens = 3
  config.eval.qps_queries = 4
  config.eval.batch_size = 8
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("eval")
  config = small_config(tmp)
  workdir = str(tmp / "run")
  loop.run(config, workdir)
  return config, workdir


def test_evaluate_writes_scores_embeddings_and_lists(trained):
  config, workdir = trained
  report = mbeir_eval.evaluate(config, workdir)

  with open(os.path.join(workdir, "eval", "results.json")) as f:
    saved = json.load(f)
  assert saved["average"] == report["average"] and saved["step"] == 2
  assert set(saved["tasks"]) == set(TASKS) and saved["missing_tasks"] == []
  assert saved["instruction_mode"] == "first" and saved["processes"] == 1
  for name, res in saved["tasks"].items():
    assert res["k"] == 5 and res["num_queries"] == 8 and 0 <= res["recall"] <= 1
    assert 0 <= res["reason_rate"] <= 1 and res["recall@1"] <= res["recall@5"] <= res["recall@10"]
    assert 0 <= res["capped_rate"] <= res["reason_rate"] and res["truncated_queries"] == 0
    q = np.load(os.path.join(workdir, "eval", f"{name}_queries.npy"))
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    with open(os.path.join(workdir, "eval", f"{name}_retrieved.jsonl")) as f:
      lines = [json.loads(x) for x in f]
    assert len(lines) == 8 and all(len(x["ranked"]) == 10 for x in lines)
  assert set(saved["qps"]) == {"adaptive", "direct", "always_reason"}
  with open(os.path.join(workdir, "eval", "results.md")) as f:
    assert "each query's first instruction" in f.read()
  local_pools = os.listdir(os.path.join(workdir, "eval", "pools"))
  assert len([n for n in local_pools if n.endswith(".npy")]) == 2  # One file per local pool.


def test_union_pool_is_encoded_once_in_bfloat16(trained):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.eval.pool, config.eval.qps_queries = "global", 0
  config.eval.embedding_dtype = "bfloat16"
  union = mbeir_eval.evaluate(config, workdir)
  assert union["pool"] == "global" and set(union["tasks"]) == set(TASKS)
  files = [n for n in os.listdir(os.path.join(workdir, "eval", "pools"))
           if n.startswith("mbeir_union_test_cand_pool") and n.endswith(".npy")]
  assert len(files) == 1 and ".bfloat16." in files[0]  # Both tasks scored against one file.
  config.eval.embedding_dtype = "float32"
  mbeir_eval.evaluate(config, workdir)
  pools = os.path.join(workdir, "eval", "pools")
  exact = np.load(os.path.join(pools, files[0].replace(".bfloat16.", ".float32.")))
  halved = np.load(os.path.join(pools, files[0])).view(ml_dtypes.bfloat16)  # Raw uint16 bits.
  np.testing.assert_array_equal(halved, exact.astype(ml_dtypes.bfloat16))


def test_root_with_some_tasks_missing(trained, tmp_path):
  """Files are checked before anything is encoded: named tasks that are missing are an error
  listing every missing file; otherwise the tasks present are evaluated and the rest named."""
  config, workdir = trained
  config = config.copy_and_resolve_references()
  root = str(tmp_path / "partial")
  shutil.copytree(config.data.root, root)
  task7 = next(t for t in mbeir_eval.eval_tasks(config, root) if t.name == "synthetic_task7")
  os.remove(os.path.join(root, task7.query_file))
  os.remove(os.path.join(root, task7.qrels_file))
  with pytest.raises(FileNotFoundError, match=r"lacks 2 file.*task7_test\.jsonl.*qrels"):
    mbeir_eval.evaluate(config, workdir, root)
  config.eval.tasks, config.eval.qps_queries = (), 0
  report = mbeir_eval.evaluate(config, workdir, root)
  assert report["missing_tasks"] == ["synthetic_task7"]
  assert "synthetic_task7" not in report["tasks"] and "synthetic_task0" in report["tasks"]


def test_random_instructions_are_seeded_per_task(trained):
  config, _ = trained
  root = config.data.root
  task = mbeir_eval.eval_tasks(config, root)[0]
  first = [it.text for it in mbeir_eval.query_items(task, root, "first")[1]]
  drawn = [it.text for it in mbeir_eval.query_items(task, root, "random", seed=3)[1]]
  assert drawn == [it.text for it in mbeir_eval.query_items(task, root, "random", seed=3)[1]]
  assert drawn != first  # Two prompts per row: some queries draw the second.
  assert drawn != [it.text for it in mbeir_eval.query_items(task, root, "random", seed=4)[1]]
  with pytest.raises(ValueError, match="instruction_mode"):
    mbeir_eval.query_items(task, root, "sometimes")


def _resave(config, src: str, dst: str, scale: float) -> None:
  """Saves the newest checkpoint of run `src` again as run `dst`'s, at the same step, in place
  of any there: its trainable weights times `scale` and, for optimizer state, a leaf no
  optimizer has (a training setup could not restore it)."""
  tok = data_setup.make_tokenizer(config.data)
  mesh = mbeir_eval.eval_mesh(config)
  cfg = trained_lib.model_config(config, src, tok)
  _, weights, step = trained_lib.restore_weights(config, src, mesh, cfg, tok)
  weights["params"]["model"] = jax.tree.map(lambda x: x * scale, weights["params"]["model"])
  shutil.rmtree(os.path.join(dst, "checkpoints", str(step)), ignore_errors=True)
  # Host arrays, saved synchronously: saving device arrays compiles a program per array.
  mngr = ocp.CheckpointManager(
    os.path.join(dst, "checkpoints"), item_names=("state", "data"),
    options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(jax.device_get(
    dict(weights, step=np.int32(step), opt_state={"junk": np.zeros(3, np.float32)})))))
  mngr.close()


def _weights(model) -> dict:
  return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}


def test_load_model_reads_weights_only(trained, tmp_path):
  """The optimizer state is never read (a checkpoint whose optimizer state no optimizer could
  have loads, with the same weights), and `eval.param_dtype` picks the weights' dtype."""
  config, workdir = trained
  expected = _weights(mbeir_eval.load_model(config, workdir)[0])
  _resave(config, workdir, str(tmp_path), scale=1.0)
  got = _weights(mbeir_eval.load_model(config, str(tmp_path))[0])
  assert got.keys() == expected.keys()
  for name, value in got.items():
    assert value.dtype == expected[name].dtype, name
    np.testing.assert_array_equal(value, expected[name], err_msg=str(name))
  config = config.copy_and_resolve_references()
  config.eval.param_dtype = "bfloat16"
  halved = _weights(mbeir_eval.load_model(config, workdir)[0])
  for name, value in halved.items():
    if np.issubdtype(expected[name].dtype, np.floating):
      assert value.dtype == ml_dtypes.bfloat16, name  # Rounded once, adapters folded first:
      np.testing.assert_allclose(value.astype(np.float32), expected[name],  # within bf16's
                                 rtol=2**-8, atol=1e-30, err_msg=str(name))  # half-ulp.


def test_retrained_checkpoint_is_encoded_again(trained, tmp_path):
  """Pool embeddings are keyed by the checkpoint's files, not its step alone: other weights
  saved at the same step in the same workdir are encoded anew."""
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.eval.tasks, config.eval.qps_queries = TASKS[:1], 0
  run = str(tmp_path / "run")
  shutil.copytree(os.path.join(workdir, "checkpoints"), os.path.join(run, "checkpoints"))
  pool_dir = os.path.join(run, "eval", "pools")

  def embeddings() -> dict:
    return {n: np.load(os.path.join(pool_dir, n)) for n in os.listdir(pool_dir)
            if n.endswith(".npy")}

  mbeir_eval.evaluate(config, run)
  before = embeddings()
  mbeir_eval.evaluate(config, run)
  assert embeddings().keys() == before.keys()  # The same checkpoint: reused.
  _resave(config, run, run, scale=2.0)
  mbeir_eval.evaluate(config, run)
  new = {n: e for n, e in embeddings().items() if n not in before}
  assert len(new) == len(before) == 1
  assert not np.allclose(next(iter(new.values())), next(iter(before.values())), atol=1e-3)


def test_stopped_pool_encoding_resumes_to_the_same_bytes(trained, tmp_path):
  """A pool encoding stopped after some chunks resumes at the first incomplete one (the
  complete ones are not encoded again) and writes the bytes of an encoding never stopped."""
  config, workdir = trained
  model, tok, _, mesh = mbeir_eval.load_model(config, workdir)
  encoder = mbeir_eval.make_encoder(config, model, tok, config.data.root, mesh)
  path = os.path.join(config.data.root, mbeir.UNION_TEST_POOL_FILE)
  n = len(pools.read_dids(path))
  chunk = 8
  assert n > 3 * chunk
  whole = pools.encode_pool(path, encoder, str(tmp_path / "whole"), "bfloat16", "t", chunk)

  calls, stop = [], [True]
  real = encoder.encode_candidates

  def stops_at_the_third(items, out):
    calls.append(len(items))
    if stop[0] and len(calls) == 3:
      raise RuntimeError("stopped")
    return real(items, out=out)

  encoder.encode_candidates = stops_at_the_third
  with pytest.raises(RuntimeError, match="stopped"):
    pools.encode_pool(path, encoder, str(tmp_path / "resumed"), "bfloat16", "t", chunk)
  calls.clear()
  stop[0] = False
  resumed = pools.encode_pool(path, encoder, str(tmp_path / "resumed"), "bfloat16", "t", chunk)
  assert sum(calls) == n - 2 * chunk and calls[0] == chunk  # Chunks 3.. only.
  names = [os.path.basename(p.path) for p in (whole.embeddings, resumed.embeddings)]
  with open(whole.embeddings.path, "rb") as a, open(resumed.embeddings.path, "rb") as b:
    assert names[0] == names[1] and a.read() == b.read()
  assert resumed.truncated == whole.truncated
  assert sorted(os.listdir(tmp_path / "resumed")) == sorted(os.listdir(tmp_path / "whole"))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_give_one_processs_recalls(trained, tmp_path):
  """`trace_jax.eval` with 2 processes x 4 devices equals 1 process x 8, on the union pool (each
  process encodes half the queries and half the pool)."""
  config, workdir = trained
  base = [sys.executable, "-m", "trace_jax.eval", "--config=configs/demo.py:steps=2,backbone=none",
          f"--config.data.root={config.data.root}", "--config.eval.max_new_tokens=3",
          "--config.eval.qps_queries=0", "--config.eval.batch_size=8", "--pool=global",
          f"--tasks={','.join(TASKS)}"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  runs = {}
  for name in ("one", "two"):
    shutil.copytree(os.path.join(workdir, "checkpoints"), str(tmp_path / name / "checkpoints"))
    runs[name] = str(tmp_path / name)
  one = subprocess.run(base + [f"--workdir={runs['one']}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900,
                       env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert one.returncode == 0, one.stderr[-3000:]
  port = _free_port()
  procs = [subprocess.Popen(
    base + [f"--workdir={runs['two']}", f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2", f"--process_id={i}"], cwd=ROOT, stdout=subprocess.PIPE,
    stderr=subprocess.PIPE, text=True,
    env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4")) for i in range(2)]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  reports = {}
  for name, path in runs.items():
    with open(os.path.join(path, "eval", "results.json")) as f:
      reports[name] = json.load(f)
  assert reports["two"]["processes"] == 2
  for task in TASKS:
    for key in ("recall@1", "recall@5", "recall@10", "reason_rate"):
      assert reports["two"]["tasks"][task][key] == reports["one"]["tasks"][task][key], (task, key)
    lists = []
    for path in runs.values():
      with open(os.path.join(path, "eval", f"{task}_retrieved.jsonl")) as f:
        lists.append([(r["qid"], r["ranked"][:5], r["reasoning"]) for r in map(json.loads, f)])
    assert lists[0] == lists[1]
  two_pools = os.listdir(os.path.join(runs["two"], "eval", "pools"))
  assert sorted(n.split(".")[-2] for n in two_pools if n.endswith(".npy")) == ["p0of2", "p1of2"]


class _ClockEncoder:
  """Stands in for the encoder: records the modes it runs and advances a fake clock by the mode's
  cost times the pass's number (counting every call from 1), so each pass takes its own time."""

  def __init__(self, cost):
    self.cost, self.calls, self.now = cost, [], 0.0

  def encode_queries(self, items, mode):
    self.now += self.cost[mode] * (1 + len(self.calls))
    self.calls.append(mode)


def test_mode_times_alternates_modes_and_pairs_rounds(monkeypatch):
  enc = _ClockEncoder({"adaptive": 2.0, "direct": 1.0, "always_reason": 5.0})
  monkeypatch.setattr(mbeir_eval.time, "perf_counter", lambda: enc.now)
  times = mbeir_eval.mode_times(enc, ["q"] * 10, rounds=3)
  # A warm-up pass of each mode, then each round every mode, the order rotating.
  assert enc.calls == ["adaptive", "direct", "always_reason",
                       "adaptive", "direct", "always_reason",
                       "direct", "always_reason", "adaptive",
                       "always_reason", "adaptive", "direct"]
  # The first three passes are the warm-up; pass i (from 1) took cost[mode] * i.
  assert times == {"adaptive": [2.0 * 4, 2.0 * 9, 2.0 * 11],
                   "direct": [1.0 * 5, 1.0 * 7, 1.0 * 12],
                   "always_reason": [5.0 * 6, 5.0 * 8, 5.0 * 10]}
  assert mbeir_eval.best_qps(times, 10) == {"adaptive": 10 / 8.0, "direct": 10 / 5.0,
                                            "always_reason": 10 / 30.0}


def _mini_root(tmp_path, kind: str) -> str:
  """mbeir_mini copied, with the CIRR task's second query (`query`) or third candidate (`cand`)
  pointing at an image file that is not there."""
  root = str(tmp_path / "mini")
  shutil.copytree(MBEIR_MINI, root)
  rel = {"query": mbeir.EVAL_TASKS_BY_NAME["cirr_task7"].query_file,
         "cand": mbeir.EVAL_TASKS_BY_NAME["cirr_task7"].pool_file}[kind]
  path = os.path.join(root, rel)
  with open(path) as f:
    lines = f.read().splitlines()
  row = 1 if kind == "query" else 2
  record = json.loads(lines[row])
  record["query_img_path" if kind == "query" else "img_path"] = "mbeir_images/gone.jpg"
  lines[row] = json.dumps(record)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return root


@pytest.mark.parametrize("kind, where", [
  ("query", r"mbeir_cirr_task7_test\.jsonl:2: qid 8:57"),
  ("cand", r"mbeir_cirr_task7_cand_pool\.jsonl:3: did 8:3")])
def test_missing_image_stops_every_process_before_model_work(tmp_path, monkeypatch, kind, where):
  """A missing image is found before the model is loaded, by every process over the whole file
  (the second query is in process 1's share of 2, the third candidate in process 0's), so
  every process raises the same error, naming file, line, id and path."""
  root = _mini_root(tmp_path, kind)
  config = demo.get_config("steps=2,backbone=none")
  config.eval.tasks = ("cirr_task7",)

  def no_model(*args):
    raise AssertionError("model loaded before the inputs were checked")

  monkeypatch.setattr(mbeir_eval, "load_model", no_model)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for p in range(2):
    monkeypatch.setattr(jax, "process_index", lambda p=p: p)
    with pytest.raises(FileNotFoundError,
                       match=where + r": image not found: .*mbeir_images/gone\.jpg$"):
      mbeir_eval.evaluate(config, str(tmp_path / "run"), root)
