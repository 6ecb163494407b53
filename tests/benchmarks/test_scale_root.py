"""The scale-rehearsal root writer (`benchmarks/scale_root.py`): counts per task follow the
M-BEIR table at the asked fraction, every file parses with trace_jax's M-BEIR readers, the bad
rows are there, and the same seed writes the same bytes."""

import filecmp
import os

import pytest

from benchmarks import scale_root
from trace_jax.data import mbeir, instructions

SCALE = 0.0002  # ~1,100 candidates, ~40 test and ~230 training queries: about a second.


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("scale") / "root")
  return out, scale_root.write_root(out, SCALE, seed=3)


def test_counts_follow_the_table_and_files_parse(root):
  out, manifest = root
  union = mbeir.load_pool(mbeir.union_test_pool_file(out))
  local_total = 0
  for name, train, test, pool in scale_root.TASK_COUNTS:
    files = mbeir.task_files(out, name)
    queries = mbeir.load_queries(files.queries)
    cands = mbeir.load_pool(files.pool)
    assert len(queries) == max(1, round(test * SCALE)) == manifest["tasks"][name]["test"]
    assert len(cands) == max(1, round(pool * SCALE)) == manifest["tasks"][name]["pool"]
    task_id = mbeir.EVAL_TASKS_BY_NAME[name].task_id
    assert {c.modality for c in cands.values()} == {mbeir.TASK_MODALITIES[task_id][1]}
    qrels = mbeir.load_qrels(files.qrels)
    assert all(set(q.pos_cand_list) == qrels[q.qid] <= set(cands) for q in queries)
    assert set(cands) <= set(union)
    local_total += len(cands)
  assert len(union) == local_total == manifest["union_test_pool"]
  keys = [mbeir.did_key(d) for d in union]
  assert keys == sorted(keys)  # The real union pool's (dataset id, n) order.
  train_pool = mbeir.load_pool(os.path.join(out, mbeir.UNION_TRAIN_POOL_FILE))
  for dataset, n in manifest["train"].items():
    queries = mbeir.load_queries(os.path.join(out, scale_root.train_query_file(dataset)))
    expected = sum(max(1, round(t * SCALE)) for name, t, _, _ in scale_root.TASK_COUNTS
                   if mbeir.EVAL_TASKS_BY_NAME[name].dataset == dataset)
    assert len(queries) == n == expected
    assert all(set(q.pos_cand_list) <= set(train_pool) for q in queries)
  assert len(instructions.load_instructions(mbeir.instructions_file(out))) == 16


def test_bad_rows_exist_and_good_images_do(root):
  out, manifest = root
  kinds = sorted(b["kind"] for b in manifest["bad_rows"])
  assert kinds == ["empty_text", "empty_text", "missing_image", "missing_image"]
  for bad in manifest["bad_rows"]:
    path = os.path.join(out, bad["file"])
    records = dict(mbeir.read_jsonl(path))
    record = records[bad["line"]]
    if bad["kind"] == "missing_image":
      query = mbeir.parse_query(record, "")
      assert query.qid == bad["id"]
      with pytest.raises(FileNotFoundError, match=bad["id"]):
        mbeir.image_of(query, out)
    else:
      assert record["did"] == bad["id"] and record["txt"] == ""
  bad_ids = {b["id"] for b in manifest["bad_rows"]}
  for t in mbeir.EVAL_TASKS:
    for q in mbeir.load_queries(os.path.join(out, t.query_file)):
      if q.qid not in bad_ids:
        mbeir.image_of(q, out)  # Raises when a good row's image is missing.


def test_same_seed_same_bytes(root, tmp_path):
  out, _ = root
  again = str(tmp_path / "again")
  scale_root.write_root(again, SCALE, seed=3)
  for rel in ("cand_pool/global/mbeir_union_test_cand_pool.jsonl",
              "query/train/mbeir_cirr_train.jsonl", "query/test/mbeir_oven_task6_test.jsonl"):
    assert filecmp.cmp(os.path.join(out, rel), os.path.join(again, rel), shallow=False)
  with pytest.raises(ValueError, match="scale"):
    scale_root.write_root(again, SCALE * 2, seed=3)
