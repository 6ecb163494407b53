"""`python -m trace_jax.eval --config=FILE[:ARGS] --workdir=DIR [--mbeir_root=DIR] [--tasks=..]
[--pool=local|global] [--num_processes=N --process_id=I --coordinator_address=HOST:PORT]`.

Evaluates the newest checkpoint in WORKDIR and writes WORKDIR/eval/ (see `mbeir_eval.py`). With
several processes (the same flags as `trace_jax.main`; -1 on TPU pods) each encodes its share.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from trace_jax import devices, processes

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].")
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_ROOT = flags.DEFINE_string("mbeir_root", None, "M-BEIR root (default: config.data.root).")
_TASKS = flags.DEFINE_list("tasks", None, "Task names, e.g. cirr_task7,mscoco_task0.")
_POOL = flags.DEFINE_enum("pool", None, ["local", "global"],
                          "Candidate pool (default: config.eval.pool, local).")


def main(argv):
  del argv
  config = _CONFIG.value
  devices.split_cpu(config.cpu_devices)  # Before JAX initialises its backend.
  processes.join()
  if _TASKS.value:
    config.eval.tasks = tuple(_TASKS.value)
  if _POOL.value:
    config.eval.pool = _POOL.value
  from trace_jax.eval import mbeir_eval  # After XLA_FLAGS: it initialises JAX.
  report = mbeir_eval.evaluate(config, _WORKDIR.value, _ROOT.value)
  print(json.dumps({"average": report["average"], "qps": report["qps"],
                    "missing_tasks": report["missing_tasks"]}))


if __name__ == "__main__":
  devices.huge_page_malloc()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
