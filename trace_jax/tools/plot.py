"""`python -m trace_jax.tools.plot --workdir=DIR`: PNG training curves from metrics.jsonl.

A training workdir (DIR/metrics.jsonl) gets DIR/curves.png: one figure, one panel per metric of
PANELS. A sweep folder (subfolders with metrics.jsonl, as `tools/sweep` writes) gets DIR/sweep.png:
the same panels with one line per variant (and, with --per_run, each variant's own curves.png).
It reads only metrics.jsonl (via `train/curves.py`) and renders with matplotlib's Agg backend, so
it needs no display and no JAX devices. It computes no metric.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # Before pyplot: files only, no display.
import matplotlib.pyplot as plt  # noqa: E402

from absl import app, flags  # noqa: E402

from trace_jax.train import curves  # noqa: E402

# (metric key, panel title, log-scale y) in panel order: 2 rows x 3 columns.
PANELS = (
  ("loss/total", "loss/total", False),
  ("loss/lm", "loss/lm (generation)", False),
  ("loss/contrastive", "loss/contrastive (InfoNCE)", False),
  ("contrastive/top1", "contrastive/top1 (in-batch)", False),
  ("route/reason_frac", "route/reason_frac", False),
  ("optim/lr", "optim/lr", False),
)
COLS = 3


def _figure(title: str):
  rows = -(-len(PANELS) // COLS)
  fig, axes = plt.subplots(rows, COLS, figsize=(4.2 * COLS, 3.2 * rows), squeeze=False)
  fig.suptitle(title)
  return fig, axes.ravel()


def _draw(axes, runs: dict[str, list[dict]]) -> None:
  """One line per run in every panel; a panel no run logged says so."""
  for ax, (key, title, log_y) in zip(axes, PANELS):
    drawn = False
    for label, rows in runs.items():
      pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
      if pts:
        steps, values = zip(*pts)
        ax.plot(steps, values, label=label, marker="." if len(pts) < 20 else None)
        drawn = True
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if log_y and drawn:
      ax.set_yscale("log")
    if not drawn:
      ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
  for ax in axes[len(PANELS):]:
    ax.axis("off")


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_run(workdir: str, out: str | None = None) -> str:
  """Curves of one run.

  Args:
    workdir: a training workdir with metrics.jsonl.
    out: PNG path (default WORKDIR/curves.png).
  Returns:
    the PNG path.
  Raises:
    FileNotFoundError naming WORKDIR/metrics.jsonl when it is missing.
  """
  rows = curves.read_metrics(workdir)
  fig, axes = _figure(os.path.basename(os.path.normpath(workdir)) or workdir)
  _draw(axes, {"run": rows})
  return _save(fig, out or os.path.join(workdir, "curves.png"))


def plot_sweep(sweep_dir: str, out: str | None = None) -> str:
  """The variants of a sweep folder in one figure, one line per variant.

  Args:
    sweep_dir: a folder whose subfolders hold metrics.jsonl.
    out: PNG path (default SWEEP_DIR/sweep.png).
  Returns:
    the PNG path.
  Raises:
    FileNotFoundError when no subfolder holds a metrics.jsonl.
  """
  names = curves.find_runs(sweep_dir)
  if not names:
    raise FileNotFoundError(f"no {curves.METRICS_FILE} in any subfolder of {sweep_dir}")
  runs = {n: curves.read_metrics(os.path.join(sweep_dir, n)) for n in names}
  fig, axes = _figure(f"sweep {os.path.basename(os.path.normpath(sweep_dir)) or sweep_dir}")
  _draw(axes, runs)
  axes[0].legend(fontsize=8)
  return _save(fig, out or os.path.join(sweep_dir, "sweep.png"))


def plot(workdir: str, per_run: bool = False) -> list[str]:
  """curves.png for a run folder, sweep.png (and with `per_run` each variant's curves.png) for a
  sweep folder; the written paths.

  Raises:
    FileNotFoundError naming WORKDIR/metrics.jsonl when `workdir` is neither.
  """
  if os.path.isfile(curves.metrics_path(workdir)):
    return [plot_run(workdir)]
  names = curves.find_runs(workdir)
  if not names:
    raise FileNotFoundError(
      f"no metrics file at {curves.metrics_path(workdir)}, and no subfolder of {workdir} holds "
      f"one: not a training workdir or a sweep folder")
  written = [plot_sweep(workdir)]
  if per_run:
    written += [plot_run(os.path.join(workdir, n)) for n in names]
  return written


def _define_flags() -> None:
  """Defined when run as a command only (tests import this module next to others that define
  `--workdir`)."""
  flags.DEFINE_string("workdir", None, "A training workdir or a sweep folder.")
  flags.DEFINE_bool("per_run", False, "For a sweep folder, also each variant's curves.png.")


def main(argv):
  del argv
  try:
    written = plot(flags.FLAGS.workdir, flags.FLAGS.per_run)
  except FileNotFoundError as e:
    raise SystemExit(f"error: {e}") from None
  for path in written:
    print(path)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
