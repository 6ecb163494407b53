"""The demo's claims from two reports: each check passes and fails on the right side of its
threshold."""

import pytest

from trace_jax.eval import demo_criteria


def report(r1, reason, qps=None):
  """Task entries for tasks 0, 3, 6, 7 from per-task R@1 and reasoning rates."""
  tasks = {}
  for i, t in enumerate((0, 3, 6, 7)):
    tasks[f"synthetic_task{t}"] = {"recall@1": r1[i], "reason_rate": reason[i],
                                   "qps": qps[i] if qps else {"adaptive": 1.0, "direct": 1.0}}
  return {"tasks": tasks}


def by_claim(checks):
  return [c.ok for c in checks]


def test_all_claims_pass():
  trace = report([0.80, 0.80, 0.60, 0.50], [0.0, 0.05, 1.0, 0.95],
                 [{"adaptive": 95.0, "direct": 100.0}] * 4)
  direct = report([0.81, 0.79, 0.45, 0.40], [0.0] * 4)
  checks = demo_criteria.check(trace, direct)
  assert by_claim(checks) == [True] * 5
  assert checks[2].value == pytest.approx(0.125)  # (0.60 + 0.50 - 0.45 - 0.40) / 2


def test_each_claim_fails_on_its_own():
  good_r1, direct = [0.80, 0.80, 0.60, 0.50], report([0.81, 0.79, 0.45, 0.40], [0.0] * 4)
  fast = [{"adaptive": 95.0, "direct": 100.0}] * 4
  cases = [
    (report(good_r1, [0.11, 0.0, 1.0, 1.0], fast), 0),  # a simple task reasons too often
    (report(good_r1, [0.0, 0.0, 1.0, 0.89], fast), 1),  # a hard task reasons too rarely
    (report([0.80, 0.80, 0.55, 0.49], [0.0, 0.0, 1.0, 1.0], fast), 2),  # gain 9.5 points
    (report([0.78, 0.80, 0.60, 0.50], [0.0, 0.0, 1.0, 1.0], fast), 3),  # task 0: -3 points
    (report(good_r1, [0.0, 0.0, 1.0, 1.0],
            [{"adaptive": 89.0, "direct": 100.0}] + fast[1:]), 4),  # 0.89x on task 0
  ]
  for trace, failing in cases:
    oks = by_claim(demo_criteria.check(trace, direct))
    assert oks == [i != failing for i in range(5)], (failing, oks)


def test_missing_task_is_named():
  trace = report([0.8] * 4, [0.0, 0.0, 1.0, 1.0])
  del trace["tasks"]["synthetic_task6"]
  with pytest.raises(KeyError, match="task 6"):
    demo_criteria.check(trace, report([0.8] * 4, [0.0] * 4))
