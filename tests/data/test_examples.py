"""`load_split` over query files that share a pool: the pool file is read once, and the examples
are those of building each file against the whole pool."""

import os

import pytest

from tests.fixtures import MBEIR_MINI
from trace_jax.data import examples as examples_lib
from trace_jax.data import instructions as instruction_lib
from trace_jax.data import mbeir

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
