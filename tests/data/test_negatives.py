"""Hard negatives (`data.hard_negatives`): which candidate each query gets, what is counted, and
the errors that name the query."""

import collections
import os

import pytest

from tests.fixtures import MBEIR_MINI
from trace_jax.data import mbeir
from trace_jax.data.examples import load_split
from trace_jax.data.negatives import NegativePicker


def cand(n: int, modality: str = "text") -> mbeir.Candidate:
  image = f"mbeir_images/x/{n}.jpg" if modality == "image" else None
  return mbeir.Candidate(f"9:{n}", None if image else f"text {n}", image, modality, None, 9)


def query(n: int, pos: tuple[int, ...], neg: tuple[int, ...] = ()) -> mbeir.Query:
  return mbeir.Query(f"9:{n}", "find it", None, "text", 0, tuple(f"9:{p}" for p in pos),
                     tuple(f"9:{x}" for x in neg), None, 9)


POOL = {c.did: c for c in [cand(i) for i in range(6)] + [cand(i, "image") for i in range(6, 9)]}


def test_none_draws_nothing():
  assert NegativePicker("none", POOL, 0, "f")(query(1, (0,), (1,)), "f:1") is None


def test_listed_draws_from_the_list_and_counts_queries_without_one():
  pick = NegativePicker("listed", POOL, 0, "f")
  drawn = collections.Counter(pick(query(1, (0,), (2, 3)), "f:1").did for _ in range(200))
  assert set(drawn) == {"9:2", "9:3"} and min(drawn.values()) > 50  # Both, seeded draws.
  assert pick.from_pool == 0
  unlisted = {pick(query(2, (0, 1)), "f:2").did for _ in range(200)}
  assert pick.from_pool == 200
  # From the pool: the positive's modality, never a positive.
  assert unlisted == {"9:2", "9:3", "9:4", "9:5"}


def test_pool_ignores_the_list_and_keeps_the_modality():
  pick = NegativePicker("pool", POOL, 0, "f")
  assert {pick(query(1, (7,), (2,)), "f:1").did for _ in range(100)} == {"9:6", "9:8"}
  assert pick.from_pool == 0  # Counted only where "listed" had to fall back.


def test_draws_are_seeded_by_seed_and_file():
  def draws(seed, name):
    pick = NegativePicker("pool", POOL, seed, name)
    return [pick(query(i, (0,)), f"{name}:{i}").did for i in range(30)]
  assert draws(0, "a") == draws(0, "a")
  assert draws(0, "a") != draws(1, "a") and draws(0, "a") != draws(0, "b")


def test_errors_name_the_query():
  with pytest.raises(KeyError, match=r"f:3: negative candidate 9:42 of query 9:3"):
    NegativePicker("listed", POOL, 0, "f")(query(3, (0,), (1, 42)), "f:3")
  only_positives = {d: c for d, c in POOL.items() if d in ("9:0", "9:1", "9:6")}
  with pytest.raises(ValueError, match=r"f:4: query 9:4: its pool has no candidate besides"):
    NegativePicker("pool", only_positives, 0, "f")(query(4, (0, 1)), "f:4")
  with pytest.raises(ValueError, match="data.hard_negatives='some'"):
    NegativePicker("some", POOL, 0, "f")


def test_examples_carry_their_negative(caplog):
  """CIRR lists a negative for some queries (the fixture: 2 of 4) and none for the others."""
  files = [("query/test/mbeir_cirr_task7_test.jsonl",
            "cand_pool/local/mbeir_cirr_task7_cand_pool.jsonl")]
  plain = load_split(MBEIR_MINI, files, None)
  assert all(e.neg_id is None for e in plain)
  with caplog.at_level("INFO"):
    hard = load_split(MBEIR_MINI, files, None, hard_negatives="listed")
  pool = mbeir.load_pool(os.path.join(MBEIR_MINI, files[0][1]))
  queries = {q.qid: q for q in mbeir.load_queries(os.path.join(MBEIR_MINI, files[0][0]))}
  assert [e.qid for e in hard] == [e.qid for e in plain]
  for e in hard:
    neg, listed = pool[e.neg_id], queries[e.qid].neg_cand_list
    assert e.neg_id in listed if listed else e.neg_id not in queries[e.qid].pos_cand_list
    assert (e.neg_text, e.neg_image) == (neg.text, neg.image_path)
  assert sum(bool(q.neg_cand_list) for q in queries.values()) == 2
  assert "2 of 4 queries list no negative" in caplog.text
