"""PNG of an evaluation report: the reasoning rate and Recall@1/@5 of every task.

`routing_png(report, path)` draws what the implicit router decided per task (the share of queries
that wrote reasoning before `<|emb|>`) next to the recall it reached. It reads the dict that
`mbeir_eval.evaluate` returns and renders with matplotlib's Agg backend; it computes no metric.
Training curves are `tools/plot`.
"""

from __future__ import annotations

from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")  # Before pyplot: files only, no display.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def routing_png(report: Mapping[str, Any], path: str) -> str:
  """Writes the two-panel figure to `path` and returns `path`.

  Raises:
    ValueError: the report has no tasks.
  """
  names = list(report["tasks"])
  if not names:
    raise ValueError("the report has no tasks to plot")
  tasks = [report["tasks"][n] for n in names]
  x = np.arange(len(names))
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
  rates = [100 * (t.get("reason_rate") or 0.0) for t in tasks]
  left.bar(x, rates, color="tab:orange")
  left.set_title(f"queries that reason ({report.get('encoder_mode', 'adaptive')} encoder), %",
                 fontsize=10)
  left.set_ylim(0, 105)
  for k in (1, 5):
    values = [100 * t.get(f"recall@{k}", 0.0) for t in tasks]
    right.bar(x + (-0.2 if k == 1 else 0.2), values, width=0.4, label=f"R@{k}")
  right.set_title("recall, %", fontsize=10)
  right.set_ylim(0, 105)
  right.legend(fontsize=8)
  for ax in (left, right):
    ax.set_xticks(x, [n.replace("_", "\n", 1) for n in names], fontsize=8)
    ax.grid(axis="y", alpha=0.3)
  fig.suptitle(f"evaluation at step {report.get('step', '?')}")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
