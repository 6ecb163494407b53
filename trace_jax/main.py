"""Entry point: `python -m trace_jax.main --config=configs/demo.py --workdir=runs/demo`.

Trains the config (resuming from WORKDIR when it holds a checkpoint) and writes metrics and
checkpoints under WORKDIR. With `eval.after_train` (the demo's default) it then evaluates the final
checkpoint (WORKDIR/eval/, as `python -m trace_jax.eval` does), prints a per-task summary and writes
WORKDIR/curves.png (training curves) and WORKDIR/eval/routing.png (reasoning rate and recall per
task).
"""

from __future__ import annotations

import json
import logging
import os

from absl import app, flags
from ml_collections import config_flags

from trace_jax import devices

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs go.")
_COORDINATOR = flags.DEFINE_string("coordinator_address",
                                   os.environ.get("TRACE_COORDINATOR", "127.0.0.1:12355"),
                                   "host:port of process 0 (runs of several processes).")
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", int(os.environ.get("TRACE_NUM_PROCESSES", "1")),
  "Processes in the run: 1, N (with --process_id), or -1 to let JAX detect them (TPU pods).")
_PROCESS_ID = flags.DEFINE_integer("process_id", int(os.environ.get("TRACE_PROCESS_ID", "0")),
                                   "This process's index.")


def main(argv):
  del argv
  config = _CONFIG.value
  devices.split_cpu(config.cpu_devices)  # Before JAX initialises its backend.
  devices.init_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from trace_jax.train import loop  # Imported after XLA_FLAGS: it initialises JAX.
  # trace_jax's own messages at INFO; libraries (Orbax, Grain, XLA) only from WARNING up.
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger("trace_jax").setLevel(logging.INFO)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  last = loop.run(config, _WORKDIR.value)
  print(json.dumps({"final": last}))
  if config.eval.after_train:
    _evaluate(config, _WORKDIR.value)


def _evaluate(config, workdir: str) -> None:
  """Evaluation, summary and plots after training (one process; pods run `trace_jax.eval`)."""
  import jax  # Initialised by now.

  from trace_jax.eval import mbeir_eval, metrics, plots
  from trace_jax.tools import plot
  if jax.process_count() > 1:
    print(f"eval.after_train: not run in a {jax.process_count()}-process run; evaluate with "
          f"`python -m trace_jax.eval --config=... --workdir={workdir}` on one host", flush=True)
    return
  report = mbeir_eval.evaluate(config, workdir)
  print(f"\nevaluation of step {report['step']} ({report['encoder_mode']} encoder, "
        f"{report['pool']} pools) -> {os.path.join(workdir, 'eval', 'results.json')}")
  print(metrics.console_table(report), end="")
  if report["qps"]:
    rates = ", ".join(f"{m} {v:.1f}" for m, v in report["qps"].items())
    print(f"queries/s over all tasks: {rates}")
  for path in (plot.plot_run(workdir),
               plots.routing_png(report, os.path.join(workdir, "eval", "routing.png"))):
    print(f"wrote {path}")


if __name__ == "__main__":
  devices.huge_page_malloc()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
