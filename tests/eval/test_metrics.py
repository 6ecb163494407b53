"""Tests of trace_jax.eval.metrics: UniIR Recall@k on the `mbeir_mini` run files and by hand.

The fixture's `runs/` folder holds UniIR-format run files and `runs/expected_metrics.json` with the
correct (`uniir_hit`) numbers and two wrong variants; every run file is scored here. Not tested
here: the M-BEIR readers themselves (tests/data/test_mbeir.py).
"""

import json
import os

import pytest

from tests.fixtures import MBEIR_MINI
from trace_jax.data import mbeir
from trace_jax.eval import metrics

_K_LIST = (1, 5, 10)
_WRONG_VARIANTS = ("fraction_of_positives", "modality_filtered_hit")

_RUNS = os.path.join(MBEIR_MINI, "runs")
_RUN_NAMES = sorted(n for n in os.listdir(_RUNS) if n.endswith("_run.txt"))


@pytest.fixture(scope="module")
def root() -> str:
  """The fixture's M-BEIR root."""
  return MBEIR_MINI


@pytest.fixture(scope="module")
def expected(root) -> dict:
  """runs/expected_metrics.json: run file name -> task, num_queries and three metric variants."""
  with open(os.path.join(root, "runs", "expected_metrics.json"), encoding="utf-8") as f:
    return json.load(f)


def _score_run(root: str, run_name: str, task_name: str) -> dict:
  """Scores one fixture run file against its task's test qrels."""
  task = mbeir.EVAL_TASKS_BY_NAME[task_name]
  ranked = metrics.read_run_file(os.path.join(root, "runs", run_name))
  qrels = mbeir.load_qrels(os.path.join(root, task.qrels_file))
  return metrics.task_result(ranked, qrels, _K_LIST, task.headline_k)


# ---------------------------------------------------------------------------- fixture run files


def test_every_run_file_has_expected_metrics(root, expected):
  assert _RUN_NAMES, "the fixture's runs/ folder has no run files"
  assert sorted(expected) == _RUN_NAMES


@pytest.mark.parametrize("run_name", _RUN_NAMES)
def test_run_file_matches_uniir_hit(root, expected, run_name):
  want = expected[run_name]
  result = _score_run(root, run_name, want["task"])
  for k in _K_LIST:
    assert result[f"recall@{k}"] == pytest.approx(want["uniir_hit"][f"Recall@{k}"]), k
  assert result["num_queries"] == want["num_queries"]
  assert want["headline_metric"] == f"Recall@{result['k']}"
  assert result["recall"] == pytest.approx(want["uniir_hit"][want["headline_metric"]])


@pytest.mark.parametrize("run_name", _RUN_NAMES)
@pytest.mark.parametrize("variant", _WRONG_VARIANTS)
def test_run_file_is_not_a_wrong_variant(root, expected, run_name, variant):
  want = expected[run_name]
  result = _score_run(root, run_name, want["task"])
  for k in _K_LIST:
    wrong = want[variant][f"Recall@{k}"]
    if wrong != want["uniir_hit"][f"Recall@{k}"]:
      assert result[f"recall@{k}"] != pytest.approx(wrong), (variant, k)


@pytest.mark.parametrize("variant", _WRONG_VARIANTS)
def test_fixture_has_a_trap_for_each_wrong_variant(expected, variant):
  """Without a differing value the test above could not fail; make sure one exists."""
  assert any(run[variant] != run["uniir_hit"] for run in expected.values())


def _fraction_of_positives(ranked, qrels, k):
  """The wrong variant: mean over queries of |positives in top k| / |positives|."""
  return sum(len(set(ranked.get(q, [])[:k]) & pos) / len(pos) for q, pos in qrels.items()) / len(
      qrels)


def _modality_filtered(ranked, qrels, k, modality_of, target):
  """The wrong variant: hit@k after dropping candidates whose modality is not the target."""
  kept = {q: [d for d in dids if modality_of[d] == target] for q, dids in ranked.items()}
  return metrics.recall_at_k(kept, qrels, k)


@pytest.mark.parametrize("run_name", _RUN_NAMES)
def test_wrong_variants_reproduce_and_differ_for_the_stated_reason(root, expected, run_name):
  """Re-deriving the wrong numbers shows the fixture traps test what they claim to."""
  want = expected[run_name]
  task = mbeir.EVAL_TASKS_BY_NAME[want["task"]]
  ranked = metrics.read_run_file(os.path.join(root, "runs", run_name))
  qrels = mbeir.load_qrels(os.path.join(root, task.qrels_file))
  union = mbeir.load_pool(os.path.join(root, mbeir.UNION_TEST_POOL_FILE))
  modality_of = {did: cand.modality for did, cand in union.items()}
  target = mbeir.TASK_MODALITIES[task.task_id][1]
  for k in _K_LIST:
    key = f"Recall@{k}"
    assert _fraction_of_positives(ranked, qrels, k) == pytest.approx(
        want["fraction_of_positives"][key])
    assert _modality_filtered(ranked, qrels, k, modality_of, target) == pytest.approx(
        want["modality_filtered_hit"][key])


def test_union_run_mixed_modalities_by_hand(root):
  """mscoco_task0 over the union pool: positives sit at ranks 2, 1, 6 and 3; text ranks above."""
  ranked = metrics.read_run_file(
      os.path.join(root, "runs", "mbeir_mscoco_task0_union_pool_test_k10_run.txt"))
  qrels = mbeir.load_qrels(os.path.join(root, "qrels/test/mbeir_mscoco_task0_test_qrels.txt"))
  union = mbeir.load_pool(os.path.join(root, mbeir.UNION_TEST_POOL_FILE))
  # Query 9:4's identical caption (a text candidate) outranks its image: a miss at k=1.
  assert ranked["9:4"][:2] == ["9:5", "9:4"]
  assert union["9:5"].modality == "text" and union["9:4"].modality == "image"
  assert {union[d].modality for dids in ranked.values() for d in dids} == {"text", "image"}
  for k, want in {1: 1 / 4, 2: 2 / 4, 3: 3 / 4, 5: 3 / 4, 6: 1.0, 10: 1.0}.items():
    assert metrics.recall_at_k(ranked, qrels, k) == pytest.approx(want), k


def test_run_file_orders_by_rank_column(root, tmp_path):
  src = os.path.join(root, "runs", "mbeir_oven_task6_single_pool_test_k10_run.txt")
  with open(src, encoding="utf-8") as f:
    lines = f.readlines()
  shuffled = tmp_path / "run.txt"
  shuffled.write_text("".join(reversed(lines)), encoding="utf-8")
  assert metrics.read_run_file(str(shuffled)) == metrics.read_run_file(src)
  assert metrics.read_run_file(src)["5:311"][:2] == ["5:17", "5:250117"]


# ------------------------------------------------------------------------------- by hand


def test_two_positives_count_once_and_unranked_query_is_a_miss():
  ranked = {"9:3": ["9:25", "9:11", "9:2", "9:3"], "9:7": ["9:7"]}
  positives = {"9:3": {"9:2", "9:3"}, "9:7": {"9:7"}, "9:21": {"9:21"}}  # 9:21 has no ranking.
  assert metrics.recall_at_k(ranked, positives, 1) == pytest.approx(1 / 3)
  assert metrics.recall_at_k(ranked, positives, 2) == pytest.approx(1 / 3)
  # 9:3 hits with one of its two positives: a full hit, not 1/2.
  assert metrics.recall_at_k(ranked, positives, 3) == pytest.approx(2 / 3)
  assert metrics.recall_at_k(ranked, positives, 4) == pytest.approx(2 / 3)
  assert metrics.recall_at_k(ranked, positives, 50) == pytest.approx(2 / 3)


def test_no_candidate_filtering():
  """The query's own item and positives absent from the pool are taken as they are."""
  # CIRR: the reference image 8:1 at rank 1 is not removed, so the positive stays at rank 2.
  assert metrics.recall_at_k({"8:12": ["8:1", "8:2"]}, {"8:12": {"8:2"}}, 1) == 0.0
  # OVEN: an INFOSEEK-prefixed positive is kept; retrieving it (union pool) is a hit.
  positives = {"5:311": {"5:17", "6:4242"}}
  assert metrics.recall_at_k({"5:311": ["6:4242", "5:17"]}, positives, 1) == 1.0
  assert metrics.recall_at_k({"5:311": ["5:230", "5:17"]}, positives, 1) == 0.0


def test_qid_and_did_namespaces_are_separate():
  # Query 9:2's positive is did 9:1; retrieving did 9:2 is not a hit.
  assert metrics.recall_at_k({"9:2": ["9:2", "9:1"]}, {"9:2": {"9:1"}}, 1) == 0.0


def test_unknown_qid_is_named():
  with pytest.raises(ValueError, match="'9:99'"):
    metrics.recall_at_k({"9:4": ["9:4"], "9:99": ["9:1"]}, {"9:4": {"9:4"}}, 1)


@pytest.mark.parametrize("k", [0, -1])
def test_bad_k(k):
  with pytest.raises(ValueError, match="k must be"):
    metrics.recall_at_k({"9:4": ["9:4"]}, {"9:4": {"9:4"}}, k)


def test_empty_qrels_and_string_ranking():
  with pytest.raises(ValueError, match="no queries"):
    metrics.recall_at_k({}, {}, 1)
  with pytest.raises(TypeError, match="9:4"):
    metrics.recall_at_k({"9:4": "9:4"}, {"9:4": {"9:4"}}, 1)


_GOOD = "9:4 Q0 9:4 1 0.62 run 0\n"


@pytest.mark.parametrize("bad_line, message", [
    ("9:4 Q0 9:6 2 0.597 run\n", "expected 7 columns"),
    ("9:4 X0 9:6 2 0.597 run 0\n", "'Q0'"),
    ("9:4 Q0 9:6 two 0.597 run 0\n", "rank must be"),
    ("9:4 Q0 9:6 0 0.597 run 0\n", "rank must be"),
    ("9:4 Q0 9:6 2 high run 0\n", "score must be"),
    ("9:4 Q0 9:6 2 nan run 0\n", "score must be"),
    ("9:4 Q0 9:6 1 0.597 run 0\n", "rank 1 twice"),
])
def test_malformed_run_line_names_file_and_line(tmp_path, bad_line, message):
  path = tmp_path / "run.txt"
  path.write_text(_GOOD + "\n" + bad_line, encoding="utf-8")
  with pytest.raises(metrics.RunFileError, match=message) as info:
    metrics.read_run_file(str(path))
  assert str(info.value).startswith(f"{path}:3:")


def test_rank_gap_is_an_error(tmp_path):
  path = tmp_path / "run.txt"
  path.write_text(_GOOD + "9:4 Q0 9:6 3 0.5 run 0\n", encoding="utf-8")
  with pytest.raises(metrics.RunFileError, match="'9:4' lacks rank 2"):
    metrics.read_run_file(str(path))


# ------------------------------------------------------------------ results, summary, table


def test_task_result_layout():
  ranked = {"1:1": ["1:9", "1:8", "1:1"], "1:2": ["1:2"]}
  qrels = {"1:1": {"1:1"}, "1:2": {"1:2"}}
  result = metrics.task_result(ranked, qrels, (1, 10), headline_k=10, reason_rate=0.25)
  assert result == {"recall": 1.0, "k": 10, "recall@1": 0.5, "recall@10": 1.0,
                    "num_queries": 2, "reason_rate": 0.25}
  with pytest.raises(ValueError, match="reason_rate"):
    metrics.task_result(ranked, qrels, (1,), 5, reason_rate=1.5)


def _two_task_summary(reason_rate=0.5):
  """mscoco_task0 with 4 queries at R@5 = 1, cirr_task7 with 1 query at R@5 = 0."""
  big = {f"9:{n}": {f"9:{n}"} for n in range(1, 5)}
  small = {"8:12": {"8:2"}}
  return metrics.summary({
      "mscoco_task0": metrics.task_result({q: list(p) for q, p in big.items()}, big, _K_LIST, 5,
                                          reason_rate=reason_rate),
      "cirr_task7": metrics.task_result({"8:12": ["8:1"]}, small, _K_LIST, 5, reason_rate=0.0),
  })


def test_summary_average_is_unweighted_and_json_ready():
  report = metrics.summary(json.loads(json.dumps(_two_task_summary()["tasks"])))
  assert report["average"] == pytest.approx(0.5)  # Weighting by queries would give 0.8.
  assert list(report["tasks"]) == ["mscoco_task0", "cirr_task7"]
  assert report["tasks"]["mscoco_task0"]["recall"] == 1.0
  assert report["tasks"]["mscoco_task0"]["k"] == 5
  assert report["tasks"]["cirr_task7"]["num_queries"] == 1
  assert report["average_reason_rate"] == pytest.approx(0.25)
  assert _two_task_summary(reason_rate=None)["average_reason_rate"] is None
  with pytest.raises(ValueError, match="at least one"):
    metrics.summary({})


def test_markdown_table():
  table = metrics.markdown_table(_two_task_summary())
  lines = table.splitlines()
  assert lines[0] == "| Task | Dataset | Metric | Recall | Reason rate | Queries |"
  assert lines[2] == "| 0. qt→ci | MSCOCO | R@5 | 100.0 | 50.0 | 4 |"
  assert lines[3] == "| 7. (qi,qt)→ci | CIRR | R@5 | 0.0 | 0.0 | 1 |"
  assert lines[4] == "| **Average** | 2 tasks | | **50.0** | 25.0 | |"
  assert len(lines) == 5 and table.endswith("\n")
