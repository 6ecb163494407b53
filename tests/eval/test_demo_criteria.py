"""The demo's claims from the reports: each check passes and fails on the right side of its
threshold, on one seed or the mean of several."""

import pytest

from trace_jax.eval import demo_criteria

N_CLAIMS = 9
FAST = [{"adaptive": 95.0, "direct": 100.0}] * 4


def report(r1, r5, reason=(0.0, 0.0, 1.0, 1.0), qps=FAST):
  """Task entries for tasks 0, 3, 6, 7 from per-task R@1, R@5 and reasoning rates."""
  return {"tasks": {f"synthetic_task{t}": {"recall@1": r1[i], "recall@5": r5[i],
                                           "reason_rate": reason[i], "qps": qps[i]}
                    for i, t in enumerate((0, 3, 6, 7))}}


GOOD = dict(r1=[0.80, 0.80, 0.60, 0.50], r5=[0.95, 0.95, 0.90, 0.80])
DIRECT = report([0.81, 0.79, 0.45, 0.40], [0.96, 0.94, 0.85, 0.72])


def oks(checks):
  return [c.ok for c in checks]


def test_all_claims_pass():
  checks = demo_criteria.check(report(**GOOD), DIRECT)
  assert oks(checks) == [True] * N_CLAIMS
  assert checks[2].value == pytest.approx(0.125)  # (0.60 + 0.50 - 0.45 - 0.40) / 2
  assert checks[3].value == pytest.approx(0.065)  # (0.90 + 0.80 - 0.85 - 0.72) / 2
  assert checks[7].value == pytest.approx(0.94)


def test_each_claim_fails_on_its_own():
  r1, r5 = GOOD["r1"], GOOD["r5"]
  cases = [
    (report(r1, r5, [0.11, 0.0, 1.0, 1.0]), DIRECT, 0),  # a simple task reasons too often
    (report(r1, r5, [0.0, 0.0, 1.0, 0.89]), DIRECT, 1),  # a hard task reasons too rarely
    (report([0.80, 0.80, 0.55, 0.49], r5), DIRECT, 2),  # R@1 gain 9.5 points
    (report(r1, [0.95, 0.95, 0.88, 0.78]), DIRECT, 3),  # R@5 gain 4.5 points, each task >= 0
    (report(r1, [0.95, 0.95, 0.84, 0.90]), DIRECT, 4),  # R@5 gain 8.5 but task 6 -1 point
    (report([0.78, 0.80, 0.60, 0.50], r5), DIRECT, 5),  # task 0: -3 points R@1
    (report(r1, [0.95, 0.91, 0.90, 0.80]), DIRECT, 6),  # task 3: -3 points R@5
    (report([0.40, 0.40, 0.60, 0.50], [0.78, 0.78, 0.90, 0.80]),  # a blind baseline
     report([0.38, 0.39, 0.45, 0.40], [0.79, 0.78, 0.85, 0.72]), 7),
    (report(r1, r5, qps=[{"adaptive": 89.0, "direct": 100.0}] + FAST[1:]), DIRECT, 8),
  ]
  for trace, direct, failing in cases:
    got = oks(demo_criteria.check(trace, direct))
    assert got == [i != failing for i in range(N_CLAIMS)], (failing, got)


def test_seeds_are_averaged():
  """Two seeds: a claim holds on their mean even when one seed alone misses it."""
  weak = report([0.80, 0.80, 0.52, 0.45], GOOD["r5"])  # R@1 gain 6 points alone
  strong = report([0.80, 0.80, 0.66, 0.55], GOOD["r5"])  # 18 points alone
  assert not demo_criteria.check(weak, DIRECT)[2].ok
  checks = demo_criteria.check([weak, strong], [DIRECT, DIRECT])
  assert checks[2].value == pytest.approx(0.12) and checks[2].ok


def test_missing_task_is_named():
  trace = report(**GOOD)
  del trace["tasks"]["synthetic_task6"]
  with pytest.raises(KeyError, match="task 6"):
    demo_criteria.check(trace, DIRECT)
