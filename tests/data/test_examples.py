"""`load_split` over query files that share a pool (the pool file is read once; the examples are
those of building each file against the whole pool), and what the examples cost in memory."""

import os
import pickle
import tracemalloc

import pytest

from tests.fixtures import MBEIR_MINI
from trace_jax.data import examples as examples_lib
from trace_jax.data import instructions as instruction_lib
from trace_jax.data import mbeir
from trace_jax.data import pipeline

POOL = mbeir.UNION_TEST_POOL_FILE
CIRR_POOL = "cand_pool/local/mbeir_cirr_task7_cand_pool.jsonl"
FILES = [("query/test/mbeir_mscoco_task0_test.jsonl", POOL),
         ("query/test/mbeir_cirr_task7_test.jsonl", CIRR_POOL),
         ("query/test/mbeir_mscoco_task3_test.jsonl", POOL)]


@pytest.mark.parametrize("hard_negatives", ["none", "pool"])
def test_a_shared_pool_is_read_once_and_examples_do_not_change(monkeypatch, hard_negatives):
  instructions = instruction_lib.load_instructions(mbeir.instructions_file(MBEIR_MINI))
  want = []
  for query_file, pool_file in FILES:
    pool = mbeir.load_pool(os.path.join(MBEIR_MINI, pool_file))
    want += examples_lib.build_examples(MBEIR_MINI, os.path.join(MBEIR_MINI, query_file), pool,
                                        instructions, hard_negatives=hard_negatives)
  reads = []
  read_jsonl = mbeir.read_jsonl

  def counted(path):
    reads.append(os.path.relpath(path, MBEIR_MINI))
    return read_jsonl(path)

  monkeypatch.setattr(mbeir, "read_jsonl", counted)
  got = examples_lib.load_split(MBEIR_MINI, FILES, None, hard_negatives=hard_negatives)
  assert reads.count(POOL) == 1
  assert got == want and len(got) > 4


def test_grouping_by_task_holds_no_copy_of_the_examples():
  """The pipeline's records are made as they are read: grouping a million examples must not add a
  dict per example beside them (~0.5 KB each), and the records equal `to_dict`."""
  exs = [examples_lib.TrainExample(f"f:{i}", f"0:{i}", i % 3, f"text {i}", None, None, f"1:{i}",
                                   f"cand {i}", None) for i in range(2000)]
  tracemalloc.start()
  by_task = pipeline.group_by_task(exs)
  held, _ = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert held < 32 * len(exs)  # A list slot (8 bytes) and list growth per example.
  assert [r for t in sorted(by_task) for r in by_task[t]] == [
      e.to_dict() for t in range(3) for e in exs if e.task_id == t]
  assert by_task[1][1:3] == [exs[4].to_dict(), exs[7].to_dict()]
  assert pickle.loads(pickle.dumps(exs[5])) == exs[5]  # Grain workers get examples pickled.
  assert examples_lib.TrainExample.from_dict(exs[5].to_dict()) == exs[5]
