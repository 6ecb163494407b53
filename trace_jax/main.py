"""Entry point: `python -m trace_jax.main --config=configs/demo.py --workdir=runs/demo`.

For now (until the train loop lands) it builds the config's model born sharded on the configured
mesh, checks the parameter sharding, runs one jitted forward pass on a generated image+text batch
and writes `WORKDIR/forward.json`. It does not train yet.
"""

from __future__ import annotations

import json
import logging
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs go.")


def main(argv):
  del argv
  config = _CONFIG.value
  if config.cpu_devices and "xla_force_host_platform_device_count" not in os.environ.get(
      "XLA_FLAGS", ""):  # Must happen before JAX initialises its CPU backend.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={config.cpu_devices}")
  from trace_jax import forward_check  # Imported after flags: it initialises JAX.
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  summary = forward_check.run(config, _WORKDIR.value)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  with open(os.path.join(_WORKDIR.value, "forward.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(json.dumps(summary))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
