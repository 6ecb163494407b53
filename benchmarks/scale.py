"""Scale rehearsal: one heavy stage (teacher, training or evaluation) run as users run it, over
M-BEIR-shaped roots at fractions F of the real sizes, with a tiny model and a real tokenizer.

    python -m benchmarks.scale --stage=teach|train|eval --scales=0.0005,0.001,0.003
        [--root=runs/scale] [--seed=0] [--train_epochs=1.0] [--timeout_s=3600]

Per scale it writes (once; reused) the root `ROOT/root_F` (`benchmarks/scale_root.py`), runs
the stage's command in fresh processes, and prints one JSON line {"stage", "scale", "wall_s",
"items", "items_per_s", "peak_rss_mb", "bytes_written", ...}; last, {"stage", "time_slope",
"rss_slope"}: least-squares slopes of log wall_s and log peak_rss_mb against log F (1.0: linear
in the data; 0: flat). Peak RSS is the largest VmHWM of any process of the stage (a child and
its descendants, e.g. Grain workers), polled from /proc every 0.2 s.

The model (`configs/scale.py`) and its tokenizer are made once under ROOT/model: a byte-level BPE
with Qwen2's special tokens trained on the roots' vocabulary, and a run trained for a few steps
on the smallest root, which then acts as the teacher and is evaluated. The stages:
- teach: `trace_jax.tools.teach`, all phases and the merge, over the ten training files, routed
  by dataset (the reasoning subset: CIRR, FashionIQ, InfoSeek, OVEN); 8 new tokens per query.
  items = reasoning queries.
- train: `trace_jax.main` over the ten training files for `--train_epochs` epochs of the root
  (steps = ceil(epochs x queries / batch)). items = examples drawn (steps x batch).
- eval: `trace_jax.eval` on 2 processes (localhost coordinator), the local pools, then the union
  pool. items = queries scored + candidates encoded, over both runs. The task holding the root's
  missing query image (cirr_task7) is left out unless --eval_all_tasks: evaluation stops there
  with a named error (what a user gets), and no number would be measured.
`--stage=profile` instead runs tracemalloc and cProfile over the parts that read whole files
(the training examples, one process's share of the union pool) in this process.
A stage that fails prints its line with "error" (the log's last lines) and no slope counts it.
Timing only; the root writer has a test (tests/benchmarks/test_scale_root.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

from absl import app, flags

from benchmarks import scale_root

_STAGE = flags.DEFINE_enum("stage", None, ["teach", "train", "eval", "profile"],
                           "Stage to run (profile: where the file-reading parts' memory and "
                           "time go, in this process).")
_SCALES = flags.DEFINE_list("scales", ["0.0005", "0.001", "0.003"], "Fractions F of M-BEIR.")
_ROOT = flags.DEFINE_string("root", "runs/scale", "Folder of the roots, model and outputs.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the roots.")
_EPOCHS = flags.DEFINE_float("train_epochs", 1.0, "Epochs of the root the train stage runs.")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 3600, "Per command.")
_EVAL_ALL = flags.DEFINE_bool(
  "eval_all_tasks", False, "Evaluate all 16 tasks. trace_jax.eval stops at the root's missing "
  "query image (cirr_task7) with a FileNotFoundError naming the qid and path, so by default the "
  "eval stage leaves that task out and completes.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_SCALE = 0.0005  # The root the model is trained on.
MODEL_STEPS = 4
QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                  "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                  "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                  "<|image_pad|>", "<|video_pad|>")
# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2-VL / Qwen2.5-VL).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


# ------------------------------------------------------------------------------ measuring


def _children(pids: set[int]) -> set[int]:
  """`pids` and all their live descendants."""
  parent = {}
  for name in os.listdir("/proc"):
    if name.isdigit():
      try:
        with open(f"/proc/{name}/stat") as f:
          parent[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
      except (OSError, IndexError, ValueError):
        continue
  found, frontier = set(pids), set(pids)
  while frontier:
    frontier = {p for p, pp in parent.items() if pp in frontier} - found
    found |= frontier
  return found


def _hwm_kb(pid: int) -> int:
  """VmHWM (peak resident set) of `pid` in kB, 0 once it is gone."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def run_measured(cmds: list[list[str]], env: dict, log_prefix: str) -> dict:
  """Runs `cmds` at once (one process each) to the end; returns {"wall_s", "peak_rss_mb",
  "returncodes", "logs"}, the peak over every process of the tree.

  Raises:
    TimeoutError: a command ran past --timeout_s (all are killed).
  """
  logs = [f"{log_prefix}.{i}.log" for i in range(len(cmds))]
  start = time.perf_counter()
  files = [open(log, "w") for log in logs]
  procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
           for cmd, f in zip(cmds, files)]
  peak, hwm = 0, {}
  while any(p.poll() is None for p in procs):
    for pid in _children({p.pid for p in procs if p.poll() is None}):
      hwm[pid] = max(hwm.get(pid, 0), _hwm_kb(pid))
    peak = max([peak, *hwm.values()])
    if time.perf_counter() - start > _TIMEOUT.value:
      for p in procs:
        p.kill()
      raise TimeoutError(f"{cmds[0][:4]} ran past {_TIMEOUT.value} s; logs {logs}")
    time.sleep(0.2)
  for f in files:
    f.close()
  return dict(wall_s=time.perf_counter() - start, peak_rss_mb=peak / 1024,
              returncodes=[p.returncode for p in procs], logs=logs)


def bytes_under(path: str) -> int:
  """Bytes of the files under `path` (0 if absent)."""
  return scale_root._bytes_under(path) if os.path.exists(path) else 0


def slope(xs: list[float], ys: list[float]) -> float | None:
  """Least-squares slope of log y on log x (None for fewer than two points)."""
  if len(xs) < 2:
    return None
  lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
  mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
  den = sum((a - mx) ** 2 for a in lx)
  return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den


# ------------------------------------------------------------------------------ model


def _env(devices: int | None = None) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return dict(env, PYTHONPATH=REPO)


def write_tokenizer(path: str) -> None:
  """A byte-level BPE (Qwen2's pre-tokenizer split, <= 1,000 ids) trained on the roots' words
  and the prompt templates, followed by Qwen2's special tokens, saved as `tokenizer.json`."""
  import tokenizers
  from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

  from configs import teach
  tok = tokenizers.Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(tokenizers.Regex(QWEN_SPLIT), behavior="isolated", invert=False),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=1000, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  templates = [v for t in (teach.COMPOSED_EDIT, teach.KNOWLEDGE_VQA, teach.DESCRIBE_TARGET,
                           teach.VERIFY_EDIT, teach.VERIFY_KNOWLEDGE, teach.VERIFY_DESCRIPTION)
               for v in (t["head"], t["body"])]
  words = " ".join(scale_root.WORDS)
  corpus = [words.capitalize() + ".", words.upper(), *templates,
            "You are a helpful assistant. Summarize above image and sentence in one word:"] * 20
  tok.train_from_iterator(corpus, trainer)
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t in QWEN2_SPECIALS])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tok.save(path)


def prepare_model(base: str) -> tuple[str, str]:
  """(tokenizer.json, trained run directory) under `base/model`, made once."""
  tokenizer = os.path.join(base, "model", "tokenizer.json")
  run = os.path.join(base, "model", "run")
  if not os.path.exists(tokenizer):
    write_tokenizer(tokenizer)
  if not os.path.exists(os.path.join(run, "config.json")):
    root = root_at(base, MODEL_SCALE)
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "trace_jax.main",
           f"--config=configs/scale.py:root={root},tokenizer={tokenizer},"
           f"steps={MODEL_STEPS},batch=16", f"--workdir={run}"]
    out = run_measured([cmd], _env(), os.path.join(base, "model", "train"))
    if out["returncodes"] != [0]:
      raise RuntimeError(f"training the scale model failed; see {out['logs']}")
  return tokenizer, run


def root_at(base: str, scale: float) -> str:
  """The root at `scale`, written on first use."""
  out = os.path.join(os.path.abspath(base), f"root_{scale:g}")
  scale_root.write_root(out, scale, _SEED.value)
  return out


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# ------------------------------------------------------------------------------ stages


def _fresh(path: str) -> str:
  shutil.rmtree(path, ignore_errors=True)
  os.makedirs(path)
  return path


def _last_json(path: str) -> dict:
  """The last line of a JSONL file as a dict ({} if absent)."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    lines = [ln for ln in f if ln.strip()]
  return json.loads(lines[-1]) if lines else {}


def stage_train(base: str, scale: float, tokenizer: str, run: str) -> dict:
  """`trace_jax.main` for --train_epochs epochs of the root's ten training files."""
  del run
  root = root_at(base, scale)
  manifest = scale_root.write_root(root, scale, _SEED.value)
  batch = 32
  steps = max(1, math.ceil(_EPOCHS.value * sum(manifest["train"].values()) / batch))
  workdir = _fresh(os.path.join(base, f"train_{scale:g}"))
  cmd = [sys.executable, "-m", "trace_jax.main",
         f"--config=configs/scale.py:root={root},tokenizer={tokenizer},steps={steps},"
         f"batch={batch}", f"--workdir={workdir}"]
  m = run_measured([cmd], _env(), workdir + "_log")
  last = _last_json(os.path.join(workdir, "metrics.jsonl"))
  return dict(m, items=steps * batch, steps=steps, bytes_written=bytes_under(workdir),
              skipped=last.get("data/skipped_total"),
              truncated=last.get("data/truncated_total"))


def stage_eval(base: str, scale: float, tokenizer: str, run: str) -> dict:
  """`trace_jax.eval` on 2 processes: the 16 local pools, then the union pool."""
  root = root_at(base, scale)
  manifest = scale_root.write_root(root, scale, _SEED.value)
  workdir = _fresh(os.path.join(base, f"eval_{scale:g}"))
  shutil.copytree(os.path.join(run, "checkpoints"), os.path.join(workdir, "checkpoints"))
  total = dict(wall_s=0.0, peak_rss_mb=0.0, returncodes=[], logs=[])
  bad_tasks = {os.path.basename(b["file"]) for b in manifest["bad_rows"]
               if b["file"].startswith("query/test/")}
  tasks = [t for t in scale_root.mbeir.EVAL_TASKS
           if _EVAL_ALL.value or os.path.basename(t.query_file) not in bad_tasks]
  for pool in ("local", "global"):
    port = _free_port()
    cmds = [[sys.executable, "-m", "trace_jax.eval",
             f"--config=configs/scale.py:root={root},tokenizer={tokenizer}",
             f"--workdir={workdir}", f"--mbeir_root={root}", f"--pool={pool}",
             f"--tasks={','.join(t.name for t in tasks)}",
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={i}"] for i in range(2)]
    m = run_measured(cmds, _env(), f"{workdir}_{pool}_log")
    total["wall_s"] += m["wall_s"]
    total["peak_rss_mb"] = max(total["peak_rss_mb"], m["peak_rss_mb"])
    total["returncodes"] += m["returncodes"]
    total["logs"] += m["logs"]
    results = os.path.join(workdir, "eval", "results.json")
    if os.path.exists(results):
      os.replace(results, os.path.join(workdir, "eval", f"results_{pool}.json"))
    if any(m["returncodes"]):
      break
  queries = sum(manifest["tasks"][t.name]["test"] for t in tasks)
  cands = sum(manifest["tasks"][t.name]["pool"] for t in tasks) + manifest["union_test_pool"]
  return dict(total, items=2 * queries + cands, tasks=len(tasks),
              bytes_written=bytes_under(os.path.join(workdir, "eval")))


def stage_teach(base: str, scale: float, tokenizer: str, run: str) -> dict:
  """`trace_jax.tools.teach`: assess, generate, verify and merge over the ten training files."""
  del tokenizer
  root = root_at(base, scale)
  manifest = scale_root.write_root(root, scale, _SEED.value)
  out = _fresh(os.path.join(base, f"teach_{scale:g}"))
  cmd = [sys.executable, "-m", "trace_jax.tools.teach", "--config=configs/teach.py",
         f"--teacher={run}", f"--mbeir_root={root}", f"--out={out}",
         "--config.cpu_devices=2", "--config.generate.max_new_tokens=8",
         "--config.data.on_bad_example=skip", "--config.progress_seconds=60"]
  m = run_measured([cmd], _env(), out + "_log")
  reasoning = sum(n for d, n in manifest["train"].items() if d in scale_root.REASONING_DATASETS)
  report = {}
  if os.path.exists(os.path.join(out, "teach_report.json")):
    from trace_jax.teach import phases
    with open(os.path.join(out, "teach_report.json")) as f:
      report = phases.report_summary(json.load(f))
  return dict(m, items=reasoning, bytes_written=bytes_under(out),
              skipped=report.get("skipped"), report=report)


def profile_parts(base: str, scale: float) -> dict:
  """In this process: tracemalloc and cProfile of the parts that read whole files, the training
  examples (`load_split`) and the union pool's pass that every evaluating process makes
  (`read_dids`: the compact dids, each candidate's image checked to exist)."""
  import cProfile
  import pstats
  import tracemalloc

  from configs import scale as scale_config
  from trace_jax.data import examples, mbeir
  from trace_jax.eval import pools
  root = root_at(base, scale)
  config = scale_config.get_config(f"root={root}")

  def split():
    return examples.load_split(root, config.data.train_files, None, target="direct")

  def dids():
    return pools.read_dids(os.path.join(root, mbeir.UNION_TEST_POOL_FILE), image_root=root)

  out = {}
  for name, fn in (("load_split", split), ("read_dids", dids)):
    tracemalloc.start()
    start = time.perf_counter()
    result = fn()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    n = len(result)
    out[name] = dict(items=n, s=round(time.perf_counter() - start, 2),
                     held_mb=round(held / 2**20, 1), peak_mb=round(peak / 2**20, 1),
                     held_bytes_per_item=round(held / n))
    profile = cProfile.Profile()
    profile.runcall(fn)
    stats = pstats.Stats(profile).sort_stats("cumulative").stats
    top = sorted(stats.items(), key=lambda kv: -kv[1][3])[:8]
    out[name]["top_cumulative_s"] = {f"{os.path.basename(k[0])}:{k[2]}": round(v[3], 2)
                                     for k, v in top}
  return out


STAGES = {"train": stage_train, "eval": stage_eval, "teach": stage_teach}


def _tail(logs: list[str], n: int = 5) -> list[str]:
  lines = []
  for log in logs:
    with open(log, errors="replace") as f:
      lines += [ln.rstrip() for ln in f][-n:]
  return lines


def main(argv):
  del argv
  base = os.path.abspath(_ROOT.value)
  scales = sorted(float(s) for s in _SCALES.value)
  if _STAGE.value == "profile":
    for scale in scales:
      print(json.dumps(dict(stage="profile", scale=scale, **profile_parts(base, scale))))
    return
  tokenizer, run = prepare_model(base)
  ok = []
  for scale in scales:
    out = STAGES[_STAGE.value](base, scale, tokenizer, run)
    row = dict(stage=_STAGE.value, scale=scale, wall_s=round(out["wall_s"], 2),
               items=out["items"], items_per_s=round(out["items"] / out["wall_s"], 2),
               peak_rss_mb=round(out["peak_rss_mb"], 1), bytes_written=out["bytes_written"])
    extras = ("steps", "tasks", "skipped", "truncated", "report")
    row.update({k: out[k] for k in extras if k in out})
    if any(out["returncodes"]):
      row["error"] = _tail(out["logs"])
    else:
      ok.append(row)
    print(json.dumps(row), flush=True)
  xs = [r["scale"] for r in ok]
  print(json.dumps(dict(stage=_STAGE.value, scales=xs,
                        time_slope=slope(xs, [r["wall_s"] for r in ok]),
                        rss_slope=slope(xs, [r["peak_rss_mb"] for r in ok]))), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["stage"])
  app.run(main)
