"""Entry point: `python -m trace_jax.main --config=configs/demo.py --workdir=runs/demo`.

Builds the config's `backbone` when it has one and it is not there yet (the demo fine-tunes a
backbone that it pretrains once, `trace_jax/train/backbone.py`), then trains the config (resuming
from WORKDIR when it holds a checkpoint) and writes metrics,
checkpoints and the config (`config.json`, which tools such as the teacher read back) under
WORKDIR. With `eval.after_train` (the demo's default) it then evaluates the final
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

from trace_jax import devices, processes

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs go.")


def main(argv):
  del argv
  config = _CONFIG.value
  devices.split_cpu(config.cpu_devices)  # Before JAX initialises its backend.
  processes.join()
  from trace_jax.train import backbone, loop  # Imported after XLA_FLAGS: they initialise JAX.
  # trace_jax's own messages at INFO; libraries (Orbax, Grain, XLA) only from WARNING up.
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger("trace_jax").setLevel(logging.INFO)
  if config.get("backbone"):  # The pretrained model it fine-tunes, built once (the demo's).
    backbone.ensure(config.backbone)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  import jax
  if jax.process_index() == 0:  # The run's config beside its checkpoints (tools read it back).
    with open(os.path.join(_WORKDIR.value, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2) + "\n")
  last = loop.run(config, _WORKDIR.value)
  print(json.dumps({"final": last}))
  if config.eval.after_train:
    _evaluate(config, _WORKDIR.value)


def _evaluate(config, workdir: str) -> None:
  """Evaluation (every process takes its share), then the summary and plots on process 0."""
  import jax  # Initialised by now.

  from trace_jax.eval import mbeir_eval, metrics, plots
  from trace_jax.tools import plot
  report = mbeir_eval.evaluate(config, workdir)
  if jax.process_index():
    return
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
