"""Entry point: `python -m trace_jax.main --config=configs/demo.py --workdir=runs/demo`.

Trains the config (resuming from WORKDIR when it holds a checkpoint) and writes metrics and
checkpoints under WORKDIR. Evaluation is `trace_jax.eval`.
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


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
