"""Evaluates a trained checkpoint on M-BEIR (or the demo world, same format) with the routing
encoder: Recall@k per task by UniIR's rules, reasoning rate per task, queries/s per encoder mode.

Writes under WORKDIR/eval/: results.json, results.md (a table shaped like the paper's), the query
and candidate embeddings (.npy) and the retrieved lists (.jsonl: qid, ranked dids, scores, the
generated reasoning) so results can be re-scored by other tools. Training is not here.
"""

from __future__ import annotations

import gc
import json
import os
import time

import numpy as np
from flax import nnx

from trace_jax.data import instructions as instruction_lib
from trace_jax.data import mbeir, synthetic
from trace_jax.data import setup as data_setup
from trace_jax.eval import metrics
from trace_jax.infer.encode import MODES, Encoder, Item
from trace_jax.infer.retrieval import top_k
from trace_jax.train import checkpoint
from trace_jax.train.loop import build

K_LIST = (1, 5, 10)


def eval_tasks(config, root: str) -> list[mbeir.EvalTask]:
  """The configured tasks: the demo world's, or M-BEIR's 16 (filtered by `eval.tasks`)."""
  world = os.path.exists(os.path.join(root, "world.json"))
  tasks = synthetic.eval_tasks(root) if world else list(mbeir.EVAL_TASKS)
  wanted = tuple(config.eval.tasks)
  unknown = set(wanted) - {t.name for t in tasks}
  if unknown:
    raise KeyError(f"eval.tasks names unknown tasks {sorted(unknown)}")
  return [t for t in tasks if not wanted or t.name in wanted]


def load_model(config, workdir: str):
  """(model with the newest checkpoint's weights, tokenizer, step, mesh)."""
  s = build(config)
  state, step = checkpoint.restore_state(workdir, s.state)
  return nnx.merge(s.graphdef, state.params["model"], state.frozen), s.tok, step, s.mesh


def query_items(task: mbeir.EvalTask, root: str) -> tuple[list[mbeir.Query], list[Item]]:
  """A task's test queries and their encoder items (first instruction prompt, as UniIR tests)."""
  table = instruction_lib.load_instructions(mbeir.instructions_file(root))
  queries = mbeir.load_queries(os.path.join(root, task.query_file))
  target = instruction_lib.target_modality(task.task_id)
  text = instruction_lib.query_text_with_instruction
  return queries, [Item(text(q, target, table, mode="first"), q.image_path) for q in queries]


def make_encoder(config, model, tok, root: str, mesh=None) -> Encoder:
  """The routing encoder with the config's batch size, prompt buckets, reasoning limit and the
  readout and candidate prompt the model was trained with; with `mesh`, each batch is split over
  its devices."""
  return Encoder(model, tok, image_grid=config.data.image_grid, root=root,
                 batch_size=config.eval.batch_size, prompt_buckets=config.eval.prompt_buckets,
                 max_new_tokens=config.eval.max_new_tokens,
                 compact_prompts=config.data.compact_prompts,
                 decode_chunk=config.eval.decode_chunk, mesh=mesh, readout=config.loss.readout,
                 eor_id=data_setup.marker_id(config.data, tok),
                 cand_reasoning=config.data.cand_target != "none")


def _pool(path: str, encoder: Encoder) -> tuple[list[str], np.ndarray]:
  """(candidate ids, their embeddings) of a pool file."""
  pool = mbeir.load_pool(path)
  return list(pool), encoder.encode_candidates([Item(c.text, c.image_path)
                                                for c in pool.values()])


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
  """Runs the evaluation and writes WORKDIR/eval/*; returns the results dict.

  `eval.pool`: "local" scores each task against its own pool (M-BEIR's reported setting);
  "global" against the union test pool, with no filtering of candidates by modality (as UniIR).
  """
  root = root or config.data.root
  if config.eval.pool not in ("local", "global"):
    raise ValueError(f"eval.pool={config.eval.pool!r}; expected 'local' or 'global'")
  model, tok, step, mesh = load_model(config, workdir)
  encoder = make_encoder(config, model, tok, root, mesh)
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  results, qps = {}, {m: [] for m in MODES}
  union = (_pool(mbeir.union_test_pool_file(root), encoder) if config.eval.pool == "global"
           else None)
  for task in eval_tasks(config, root):
    queries, q_items = query_items(task, root)
    dids, cands = union or _pool(os.path.join(root, task.pool_file), encoder)
    enc = encoder.encode_queries(q_items, config.eval.mode)
    scores, idx = top_k(enc.embeddings, cands, max(K_LIST), mesh=mesh)
    ranked = {q.qid: [dids[i] for i in row] for q, row in zip(queries, idx)}
    qrels = mbeir.load_qrels(os.path.join(root, task.qrels_file))
    results[task.name] = metrics.task_result(ranked, qrels, K_LIST, task.headline_k,
                                             reason_rate=float(enc.reasoned.mean()))
    np.save(os.path.join(out_dir, f"{task.name}_queries.npy"), enc.embeddings)
    np.save(os.path.join(out_dir, f"{task.name}_candidates.npy"), cands)
    with open(os.path.join(out_dir, f"{task.name}_retrieved.jsonl"), "w") as f:
      for q, row, s, text in zip(queries, idx, scores, enc.texts):
        f.write(json.dumps({"qid": q.qid, "ranked": [dids[i] for i in row],
                            "scores": [round(float(x), 6) for x in s], "reasoning": text}) + "\n")
    if config.eval.qps_queries:
      sample = q_items[:config.eval.qps_queries]
      results[task.name]["qps"] = task_qps(encoder, sample, config.eval.qps_rounds)
      for mode, rate in results[task.name]["qps"].items():
        qps[mode].append((len(sample), rate))
  report = metrics.summary(results)
  report["step"] = step
  report["encoder_mode"] = config.eval.mode
  report["pool"] = config.eval.pool
  report["qps"] = {m: sum(n for n, _ in v) / sum(n / r for n, r in v) for m, v in qps.items() if v}
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(metrics.markdown_table(report) + "\n")
  return report
