"""The demo's claims, checked from `results.json` files: the TRACE runs' and the direct-only runs'
(`configs/demo.py:ablation=direct`), one of each per seed; every number is the mean over seeds.

Recall is M-BEIR's headline metric for these tasks, R@5, and R@1 beside it.

1. routing: >= 90% of the simple-task queries (tasks 0, 3) skip reasoning and >= 90% of the
   question/edit queries (tasks 6, 7) reason;
2. reasoning pays: on tasks 6 and 7 averaged, TRACE beats direct-only by >= 10 points R@1 and
   >= 5 points R@5, and neither task is below direct-only at R@5;
3. adaptivity costs simple queries nothing: on each of tasks 0 and 3, TRACE is at most 2 points
   below direct-only at R@1 and at R@5, against a baseline that sees (direct-only R@5 >= 80 on
   each);
4. speed: adaptive queries/s >= 0.9x direct queries/s on the simple tasks (the TRACE runs' own
   timing).

Pure arithmetic on the reports; the numbers come from `mbeir_eval.evaluate`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

SIMPLE, HARD = (0, 3), (6, 7)
Report = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Check:
  claim: str
  value: float
  threshold: float
  ok: bool

  def line(self) -> str:
    verdict = "pass" if self.ok else "FAIL"
    return f"[{verdict}] {self.claim}: {self.value:.3f} (needs {self.threshold})"


def _task(report: Report, task_id: int) -> Mapping[str, Any]:
  matches = [r for name, r in report["tasks"].items() if name.endswith(f"_task{task_id}")]
  if len(matches) != 1:
    raise KeyError(f"the report has {len(matches)} entries for task {task_id}; expected one")
  return matches[0]


def _mean(reports: Sequence[Report], task_id: int, value: Callable[[Mapping], float]) -> float:
  """`value` of the task's entry, averaged over the reports (the seeds)."""
  return sum(value(_task(r, task_id)) for r in reports) / len(reports)


def _at_least(claim: str, value: float, threshold: float) -> Check:
  return Check(claim, value, threshold, value >= threshold - 1e-9)


def check(trace: Report | Sequence[Report], direct: Report | Sequence[Report]) -> list[Check]:
  """The claims for the TRACE reports (adaptive encoder) against the direct-only ones: one
  report of each, or one per seed (means over seeds)."""
  trace = [trace] if isinstance(trace, Mapping) else list(trace)
  direct = [direct] if isinstance(direct, Mapping) else list(direct)
  if not trace or not direct:
    raise ValueError("need at least one TRACE and one direct-only report")

  def recall(reports, t, k):
    return _mean(reports, t, lambda e: e[f"recall@{k}"])

  def gain(t, k):
    return recall(trace, t, k) - recall(direct, t, k)

  skip = min(1.0 - _mean(trace, t, lambda e: e["reason_rate"]) for t in SIMPLE)
  reason = min(_mean(trace, t, lambda e: e["reason_rate"]) for t in HARD)
  qps_ratio = min(_mean(trace, t, lambda e: e["qps"]["adaptive"] / e["qps"]["direct"])
                  for t in SIMPLE)
  return [
    _at_least("simple queries that skip reasoning (worst of tasks 0, 3)", skip, 0.9),
    _at_least("hard queries that reason (worst of tasks 6, 7)", reason, 0.9),
    _at_least("R@1 gain over direct-only, mean of tasks 6, 7",
              sum(gain(t, 1) for t in HARD) / 2, 0.10),
    _at_least("R@5 gain over direct-only, mean of tasks 6, 7",
              sum(gain(t, 5) for t in HARD) / 2, 0.05),
    _at_least("R@5 change against direct-only, worst of tasks 6, 7",
              min(gain(t, 5) for t in HARD), 0.0),
    _at_least("R@1 change against direct-only, worst of tasks 0, 3",
              min(gain(t, 1) for t in SIMPLE), -0.02),
    _at_least("R@5 change against direct-only, worst of tasks 0, 3",
              min(gain(t, 5) for t in SIMPLE), -0.02),
    _at_least("direct-only R@5, worst of tasks 0, 3 (a baseline that sees)",
              min(recall(direct, t, 5) for t in SIMPLE), 0.80),
    _at_least("adaptive / direct queries/s, worst of tasks 0, 3", qps_ratio, 0.9),
  ]
