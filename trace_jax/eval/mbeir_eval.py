"""Evaluates a trained checkpoint on M-BEIR (or the demo world, same format) with the routing
encoder: Recall@k per task by UniIR's rules, reasoning rate per task, queries/s per encoder mode.

Every task's files are checked before anything is encoded: with `eval.tasks` set, a missing file
is an error listing all of them; without, the tasks whose files are all present are evaluated
and the missing ones named (in the log and in results.json). Then, still before any model work,
every line of the evaluated query and pool files is read and every image they name checked to
exist (`preflight.py`; every process reads whole files, so all raise the same error, naming
file, line, id and path; a missing image is an error, not a skip, as UniIR scores every query).
Each pool is encoded once (the union pool once for all tasks) into files on disk, streamed and
resumable (`pools.py`), keyed by a fingerprint of the checkpoint; the model's weights alone are
restored (`train/trained.py`), in `eval.param_dtype`. Queries are scored against the pool block
by block. With several processes (`--num_processes`, as `trace_jax.main`), each encodes its
share of every pool and of every task's queries on its own devices, and the recalls are those of
one process (`distributed.py`); a failure in one process's encoding (an image that does not
decode) stops every process at the end of that step (`distributed.agree`). Queries take their
instruction as `eval.instruction_mode` says: `first` (deterministic) or `random` (UniIR's draw,
seeded per task by `eval.instruction_seed`); the report names the mode.

Writes under WORKDIR/eval/ (process 0): results.json, results.md (a table shaped like the
paper's), the query embeddings (.npy; the candidates' are under eval/pools/) and the retrieved
lists (.jsonl: qid, ranked dids, scores, the generated reasoning) so results can be re-scored by
other tools. Training is not here.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import random
import time

import jax
import numpy as np

from trace_jax import sharding
from trace_jax.data import instructions as instruction_lib
from trace_jax.data import mbeir, synthetic
from trace_jax.data import setup as data_setup
from trace_jax.eval import distributed, metrics, pools, preflight
from trace_jax.infer.encode import MODES, Encoder, Item
from trace_jax.infer.retrieval import top_k
from trace_jax.train import checkpoint, trained

K_LIST = (1, 5, 10)
INSTRUCTION_MODES = ("first", "random")
_log = logging.getLogger(__name__)


def eval_tasks(config, root: str) -> list[mbeir.EvalTask]:
  """The configured tasks: the demo world's, or M-BEIR's 16 (filtered by `eval.tasks`)."""
  world = os.path.exists(os.path.join(root, "world.json"))
  tasks = synthetic.eval_tasks(root) if world else list(mbeir.EVAL_TASKS)
  wanted = tuple(config.eval.tasks)
  unknown = set(wanted) - {t.name for t in tasks}
  if unknown:
    raise KeyError(f"eval.tasks names unknown tasks {sorted(unknown)}")
  return [t for t in tasks if not wanted or t.name in wanted]


def present_tasks(tasks: list[mbeir.EvalTask], root: str, pool: str,
                  explicit: bool) -> tuple[list[mbeir.EvalTask], dict[str, list[str]]]:
  """(the tasks whose files are all under `root`, {missing task: its missing files}), checked
  before anything is encoded. Raises FileNotFoundError listing every missing file when the
  tasks were asked for by name (`explicit`), when a file every task needs is missing, or when
  no task is complete."""
  shared = [mbeir.INSTRUCTIONS_FILE]
  if pool == "global":
    shared.append(mbeir.UNION_TEST_POOL_FILE)
  missing_shared = [f for f in shared if not os.path.isfile(os.path.join(root, f))]
  missing = {}
  for t in tasks:
    files = [t.query_file, t.qrels_file] + ([t.pool_file] if pool == "local" else [])
    gone = [f for f in files if not os.path.isfile(os.path.join(root, f))]
    if gone:
      missing[t.name] = gone
  if missing_shared or (missing and explicit) or len(missing) == len(tasks):
    listed = missing_shared + [f for files in missing.values() for f in files]
    raise FileNotFoundError(f"M-BEIR root {os.path.abspath(root)} lacks {len(listed)} file(s) "
                            f"needed by {len(missing) or len(tasks)} task(s): "
                            + ", ".join(listed))
  return [t for t in tasks if t.name not in missing], missing


def pool_path(task: mbeir.EvalTask, root: str, pool: str) -> str:
  """The pool file a task is scored against: its own (`local`) or the union test pool."""
  return os.path.join(root, mbeir.UNION_TEST_POOL_FILE if pool == "global" else task.pool_file)


def check_inputs(tasks: list[mbeir.EvalTask], root: str, pool: str) -> dict[str, np.ndarray]:
  """Checks, before any model work, every line of every task's query file and pool file and
  that every image they name exists (`preflight.py`); every process checks whole files, so
  all raise the same error together. Returns {pool path: its dids} (`pools.read_dids`).

  Raises:
    FileNotFoundError: `"{file}:{line}: qid|did {id}: image not found: {path}"`.
    mbeir.MBEIRFormatError: a malformed line (names file and line).
  """
  dids = {}
  for task in tasks:
    preflight.check_query_images(os.path.join(root, task.query_file), root)
    path = pool_path(task, root, pool)
    if path not in dids:
      dids[path] = pools.read_dids(path, image_root=root)
  return dids


def eval_mesh(config) -> jax.sharding.Mesh:
  """The mesh of this process's devices that evaluation places the model on (`eval.mesh`:
  data, fsdp, tensor sizes; -1 fills): each process holds a whole copy of the model."""
  data, fsdp, tensor = config.eval.mesh
  return sharding.make_mesh(data, fsdp, tensor, devices=jax.local_devices())


def load_model(config, workdir: str):
  """(model with the newest checkpoint's weights, tokenizer, step, mesh), on `eval_mesh`."""
  return trained.load_model(config, workdir, eval_mesh(config))


def query_items(task: mbeir.EvalTask, root: str, mode: str = "first",
                seed: int = 0) -> tuple[list[mbeir.Query], list[Item]]:
  """A task's test queries and their encoder items: the instruction is the row's first prompt
  (`first`) or UniIR's random draw (`random`), seeded per task so that a query's instruction
  depends neither on the process count nor on the other tasks."""
  if mode not in INSTRUCTION_MODES:
    raise ValueError(f"eval.instruction_mode={mode!r}; expected one of {INSTRUCTION_MODES}")
  table = instruction_lib.load_instructions(mbeir.instructions_file(root))
  queries = mbeir.load_queries(os.path.join(root, task.query_file))
  target = instruction_lib.target_modality(task.task_id)
  rng = random.Random(f"{seed}:{task.name}") if mode == "random" else None
  text = instruction_lib.query_text_with_instruction
  return queries, [Item(text(q, target, table, mode=mode, rng=rng), q.image_path, q.qid)
                   for q in queries]


def make_encoder(config, model, tok, root: str, mesh=None) -> Encoder:
  """The routing encoder with the config's batch size, prompt buckets, reasoning limit, text
  limits and the readout and candidate prompt the model was trained with; with `mesh`, each
  batch is split over its devices."""
  return Encoder(model, tok, image_grid=config.data.image_grid, root=root,
                 batch_size=config.eval.batch_size, prompt_buckets=config.eval.prompt_buckets,
                 max_new_tokens=config.eval.max_new_tokens,
                 compact_prompts=config.data.compact_prompts,
                 decode_chunk=config.eval.decode_chunk, mesh=mesh, readout=config.loss.readout,
                 eor_id=data_setup.marker_id(config.data, tok),
                 cand_reasoning=config.data.cand_target != "none",
                 query_text_tokens=config.eval.query_text_tokens,
                 cand_text_tokens=config.data.cand_text_tokens, cand_len=config.data.cand_len,
                 image_workers=config.eval.image_workers)


def encoder_tag(config, step: int, weights: str = "") -> str:
  """Names what candidate embeddings depend on: the checkpoint (its step and `weights`, the
  fingerprint of its saved files: `checkpoint.fingerprint`), the restored dtype and the encoder
  settings."""
  fields = (config.data.image_grid, config.data.compact_prompts, config.data.cand_target,
            config.data.cand_text_tokens, config.data.cand_len, config.loss.readout,
            config.eval.prompt_buckets, config.eval.max_new_tokens,
            config.eval.get("param_dtype", "float32"))
  settings = hashlib.sha1(repr(fields).encode()).hexdigest()[:8]
  return f"step{step}-{weights[:12]}-{settings}" if weights else f"step{step}-{settings}"


def mode_times(encoder: Encoder, items, rounds: int) -> dict[str, list[float]]:
  """Seconds to encode `items` in each encoder mode, one entry per round, timed side by side.

  Every mode runs once first (compiling its programs); then `rounds` rounds each time every mode
  in turn. The order rotates each round (no mode always follows the slow always-reason pass) and
  garbage is collected before each timed pass. Round r's entries of two modes ran within the
  same round, so their ratio is a paired measurement.
  """
  for mode in MODES:
    encoder.encode_queries(items, mode)
  times: dict[str, list[float]] = {mode: [] for mode in MODES}
  for r in range(rounds):
    for mode in MODES[r % len(MODES):] + MODES[:r % len(MODES)]:
      gc.collect()
      start = time.perf_counter()
      encoder.encode_queries(items, mode)
      times[mode].append(time.perf_counter() - start)
  return times


def task_qps(encoder: Encoder, items, rounds: int) -> dict[str, float]:
  """Queries/s of `items` in each encoder mode (`mode_times`), each mode's best round: on a
  shared machine the fastest run is the one least disturbed by other work, and alternating keeps
  slow spells from favouring one mode."""
  return best_qps(mode_times(encoder, items, rounds), len(items))


def best_qps(times: dict[str, list[float]], n: int) -> dict[str, float]:
  """Queries/s of each mode's fastest round (`mode_times`) of `n` queries."""
  return {mode: n / min(t) for mode, t in times.items()}


def evaluate(config, workdir: str, root: str | None = None) -> dict:
  """Runs the evaluation (every process of the run calls it) and writes WORKDIR/eval/* on
  process 0; returns the results dict.

  `eval.pool`: "local" scores each task against its own pool (M-BEIR's reported setting);
  "global" against the union test pool, with no filtering of candidates by modality (as UniIR).
  """
  root = root or config.data.root
  ev = config.eval
  if ev.pool not in ("local", "global"):
    raise ValueError(f"eval.pool={ev.pool!r}; expected 'local' or 'global'")
  tasks, missing = present_tasks(eval_tasks(config, root), root, ev.pool, bool(ev.tasks))
  for name, files in missing.items():
    _log.warning("task %s not evaluated: %s missing under %s", name, ", ".join(files), root)
  pool_dids = check_inputs(tasks, root, ev.pool)
  model, tok, step, mesh = load_model(config, workdir)
  tag = encoder_tag(config, step, checkpoint.fingerprint(workdir, step))
  encoder = make_encoder(config, model, tok, root, mesh)
  out_dir = os.path.join(workdir, "eval")
  lead = jax.process_index() == 0
  os.makedirs(out_dir, exist_ok=True)
  encoded: dict[str, pools.PoolShard] = {}

  def pool_of(task) -> pools.PoolShard:
    path = pool_path(task, root, ev.pool)
    if path not in encoded:  # Each pool once (the union pool once for every task).
      encoded[path] = distributed.agree(f"encoding {path}", lambda: pools.encode_pool(
        path, encoder, os.path.join(out_dir, "pools"), ev.embedding_dtype, tag, ev.pool_chunk,
        dids=pool_dids.pop(path)))
    return encoded[path]

  results, qps = {}, {m: [] for m in MODES}
  for task in tasks:
    queries, items = query_items(task, root, ev.instruction_mode, ev.instruction_seed)
    ranked, scores, enc = _retrieve(encoder, items, pool_of(task), ev.mode, mesh, task.name)
    qrels = mbeir.load_qrels(os.path.join(root, task.qrels_file))
    result = metrics.task_result({q.qid: r for q, r in zip(queries, ranked)}, qrels, K_LIST,
                                 task.headline_k, reason_rate=float(enc["reasoned"].mean()))
    result.update(capped_rate=float(enc["capped"].mean()),
                  truncated_queries=int((enc["truncated"] > 0).sum()))
    if result["capped_rate"]:
      _log.warning("%s: %.1f%% of queries reached eval.max_new_tokens=%d without <|emb|> and "
                   "were read at their last token", task.name, 100 * result["capped_rate"],
                   ev.max_new_tokens)
    if lead:
      _write_task(out_dir, task.name, queries, ranked, scores, enc)
      if ev.qps_queries:  # Timed on process 0 alone: the rates are of one process.
        sample = items[:ev.qps_queries]
        result["qps"] = task_qps(encoder, sample, ev.qps_rounds)
        for mode, rate in result["qps"].items():
          qps[mode].append((len(sample), rate))
    results[task.name] = result
  report = metrics.summary(results)
  report.update(step=step, encoder_mode=ev.mode, pool=ev.pool,
                instruction_mode=ev.instruction_mode,
                instruction_seed=ev.instruction_seed if ev.instruction_mode == "random" else None,
                missing_tasks=sorted(missing), processes=jax.process_count(),
                embedding_dtype=ev.embedding_dtype,
                truncated_candidates={os.path.relpath(p, root): _total(s.truncated)
                                      for p, s in encoded.items()},
                qps={m: sum(n for n, _ in v) / sum(n / r for n, r in v)
                     for m, v in qps.items() if v})
  if lead:
    with open(os.path.join(out_dir, "results.json"), "w") as f:
      json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
      f.write(metrics.markdown_table(report) + "\n")
  distributed.barrier("evaluation written")
  return report


def _retrieve(encoder: Encoder, items: list[Item], pool: pools.PoolShard, mode: str, mesh,
              name: str = "queries"):
  """(ranked dids per query, their scores, the gathered per-query encoder outputs): this
  process encodes its share of the queries and ranks all of them against its share of the
  pool; the shares' top-k merge into the whole pool's. A failure to encode a query, in any
  process, stops every process (`distributed.agree`)."""
  n = len(items)
  mine = distributed.share(n)
  enc = distributed.agree(f"encoding {name}'s queries",
                          lambda: encoder.encode_queries([items[i] for i in mine], mode))
  queries = distributed.gather_rows(enc.embeddings, n)
  k = max(K_LIST)
  scores, local = top_k(queries, pool.embeddings, k, mesh=mesh)
  scores, index = distributed.merge_top_k(scores, pool.rows[local], k, len(pool.dids))
  ranked = [[pool.did(i) for i in row] for row in index]
  gathered = {"embeddings": queries, "texts": distributed.gather_strings(enc.texts, n)}
  for name in ("reasoned", "capped", "truncated"):
    gathered[name] = distributed.gather_rows(getattr(enc, name), n)
  return ranked, scores, gathered


def _write_task(out_dir: str, name: str, queries, ranked, scores, enc) -> None:
  """A task's query embeddings and retrieved lists (qid, ranked dids, scores, reasoning)."""
  np.save(os.path.join(out_dir, f"{name}_queries.npy"), enc["embeddings"])
  with open(os.path.join(out_dir, f"{name}_retrieved.jsonl"), "w") as f:
    for q, dids, s, text in zip(queries, ranked, scores, enc["texts"]):
      f.write(json.dumps({"qid": q.qid, "ranked": dids,
                          "scores": [round(float(x), 6) for x in s], "reasoning": text}) + "\n")


def _total(local_count: int) -> int:
  """A count summed over every process."""
  return int(distributed.gather_rows(np.asarray([local_count]), jax.process_count()).sum())
