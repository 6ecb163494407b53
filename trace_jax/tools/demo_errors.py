"""`python -m trace_jax.tools.demo_errors --workdir=runs/demo`: where a demo run's reasoning goes
wrong on the hard tasks (6, 7), from its evaluation (WORKDIR/eval/*_retrieved.jsonl) and the
world's rules.

Per task: how often the written reasoning describes the query image right (it opens with the
source caption), how often its answer is the positive (task 6: the answer string; task 7: the
target scene's caption), and R@1 / R@5 on the queries with a right and with a wrong answer: what
bounds recall when the embedding follows what the model wrote.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from trace_jax.data import mbeir, synthetic
from trace_jax.data import synthetic_teacher as rules

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "A demo run with an evaluation.")
_WORLD = flags.DEFINE_string("world", "runs/demo_world", "The demo world it was evaluated on.")


def analyse(world: str, eval_dir: str, task: int) -> dict:
  """The counts above for one task; raises FileNotFoundError naming a missing file."""
  files, _ = synthetic.split_files(world, "test")
  queries = mbeir.load_queries(os.path.join(world, files[task]["query"]))
  pool = mbeir.load_pool(os.path.join(world, files[task]["pool"]))
  path = os.path.join(eval_dir, f"{synthetic.DATASET_NAME}_task{task}_retrieved.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found; evaluate the run first")
  with open(path) as f:
    retrieved = {r["qid"]: r for r in map(json.loads, f)}
  out = {"queries": 0, "source_right": 0, "answer_right": 0, "r1_right": 0, "r5_right": 0,
         "r1_wrong": 0, "r5_wrong": 0}
  for q in queries:
    r, pos = retrieved[q.qid], q.pos_cand_list[0]
    cand = pool[pos]
    target = cand.text if task == 6 else rules.caption(rules.parse_scene_name(cand.image_path))
    reasoning = (r.get("reasoning") or "").strip()
    right = reasoning.endswith(target)
    side = "right" if right else "wrong"
    out["queries"] += 1
    out["source_right"] += reasoning.startswith(
      rules.caption(rules.parse_scene_name(q.image_path)) + ".")
    out["answer_right"] += right
    out[f"r1_{side}"] += r["ranked"][0] == pos
    out[f"r5_{side}"] += pos in r["ranked"][:5]
  return out


def main(argv):
  del argv
  print("task  queries  source right  answer right  R@1 | R@5 (answer right)  "
        "R@1 | R@5 (answer wrong)")
  for task in synthetic.REASON_TASKS:
    c = analyse(_WORLD.value, os.path.join(_WORKDIR.value, "eval"), task)
    wrong = c["queries"] - c["answer_right"]
    print(f"{task:>4}  {c['queries']:>7}  {c['source_right']:>12}  {c['answer_right']:>12}  "
          f"{c['r1_right']:>5} | {c['r5_right']:<3} of {c['answer_right']:<8}  "
          f"{c['r1_wrong']:>5} | {c['r5_wrong']:<3} of {wrong}")


if __name__ == "__main__":
  app.run(main)
