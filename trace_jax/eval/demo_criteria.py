"""The demo's four claims, checked from two `results.json` files: the TRACE run's and the
direct-only run's (`configs/demo.py:ablation=direct`).

1. routing: >= 90% of the simple-task queries (tasks 0, 3) skip reasoning and >= 90% of the
   question/edit queries (tasks 6, 7) reason;
2. reasoning pays: mean Recall@1 over tasks 6 and 7 beats the direct-only run by >= 10 points;
3. simple tasks are not hurt: Recall@1 on tasks 0 and 3 within 2 points of the direct-only run, or
   better;
4. adaptive queries/s >= 0.9x direct queries/s on the simple tasks (the TRACE run's own timing).

Pure arithmetic on the reports; the numbers come from `mbeir_eval.evaluate`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SIMPLE, HARD = (0, 3), (6, 7)


@dataclasses.dataclass(frozen=True)
class Check:
  claim: str
  value: float
  threshold: float
  ok: bool

  def line(self) -> str:
    verdict = "pass" if self.ok else "FAIL"
    return f"[{verdict}] {self.claim}: {self.value:.3f} (needs {self.threshold})"


def _task(report: Mapping[str, Any], task_id: int) -> Mapping[str, Any]:
  matches = [r for name, r in report["tasks"].items() if name.endswith(f"_task{task_id}")]
  if len(matches) != 1:
    raise KeyError(f"the report has {len(matches)} entries for task {task_id}; expected one")
  return matches[0]


def _mean(report, tasks, key) -> float:
  return sum(_task(report, t)[key] for t in tasks) / len(tasks)


def check(trace: Mapping[str, Any], direct: Mapping[str, Any]) -> list[Check]:
  """The four claims for `trace` (adaptive encoder) against `direct` (direct-only run)."""
  skip = min(1.0 - _task(trace, t)["reason_rate"] for t in SIMPLE)
  reason = min(_task(trace, t)["reason_rate"] for t in HARD)
  gain = _mean(trace, HARD, "recall@1") - _mean(direct, HARD, "recall@1")
  worst_simple = min(_task(trace, t)["recall@1"] - _task(direct, t)["recall@1"] for t in SIMPLE)
  qps_ratio = min(_task(trace, t)["qps"]["adaptive"] / _task(trace, t)["qps"]["direct"]
                  for t in SIMPLE)
  return [
    Check("simple queries that skip reasoning (worst of tasks 0, 3)", skip, 0.9, skip >= 0.9),
    Check("hard queries that reason (worst of tasks 6, 7)", reason, 0.9, reason >= 0.9),
    Check("R@1 gain over direct-only, mean of tasks 6, 7", gain, 0.10, gain >= 0.10),
    Check("R@1 change against direct-only, worst of tasks 0, 3", worst_simple, -0.02,
          worst_simple >= -0.02),
    Check("adaptive / direct queries/s, worst of tasks 0, 3", qps_ratio, 0.9, qps_ratio >= 0.9),
  ]
