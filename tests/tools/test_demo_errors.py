"""demo_errors: counts right and wrong answers of the written reasoning, and recall on each."""

import json
import os

from trace_jax.data import mbeir, synthetic
from trace_jax.data import synthetic_teacher as rules
from trace_jax.tools import demo_errors


def test_counts_follow_the_written_answer(tmp_path):
  world, eval_dir = str(tmp_path / "w"), tmp_path / "eval"
  synthetic.generate_world(world, n_train=40, n_test=4)
  files, _ = synthetic.split_files(world, "test")
  os.makedirs(eval_dir)
  queries = mbeir.load_queries(os.path.join(world, files[7]["query"]))
  pool = mbeir.load_pool(os.path.join(world, files[7]["pool"]))
  others = [f"10:{90000 + k}" for k in range(5)]  # Ids ranked above a missed positive.
  rows = []
  for i, q in enumerate(queries):
    pos = q.pos_cand_list[0]
    source = rules.caption(rules.parse_scene_name(q.image_path))
    target = rules.caption(rules.parse_scene_name(pool[pos].image_path))
    answer = target if i < 2 else source  # Two right, two wrong (the source left unedited).
    ranked = [pos] + others[:4] if i in (0, 2) else others + [pos]
    rows.append({"qid": q.qid, "ranked": ranked, "reasoning": f"{source}. edit. {answer}"})
  with open(eval_dir / "synthetic_task7_retrieved.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  got = demo_errors.analyse(world, str(eval_dir), 7)
  assert got == {"queries": 4, "source_right": 4, "answer_right": 2, "r1_right": 1,
                 "r5_right": 1, "r1_wrong": 1, "r5_wrong": 1}
