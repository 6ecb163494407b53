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


def main(argv):
  del argv
  config = _CONFIG.value
  devices.split_cpu(config.cpu_devices)  # Before JAX initialises its backend.
  from trace_jax.train import loop  # Imported after XLA_FLAGS: it initialises JAX.
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  last = loop.run(config, _WORKDIR.value)
  print(json.dumps({"final": last}))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
