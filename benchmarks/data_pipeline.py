"""Does the input pipeline keep up with the train step? Examples/s of each, side by side.

    python -m benchmarks.data_pipeline [--config=configs/demo.py] [--batches=20] [--steps=10]

Times `--batches` host batches of the Grain pipeline (in process, then with 2 worker processes)
and `--steps` train steps on one batch (after compiling), all in this run, and prints the
examples/s of each and their ratio; the last line is one JSON object. Timing only; no test.
"""

from __future__ import annotations

import json
import time

from absl import app, flags
from ml_collections import config_flags

from trace_jax import devices

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Experiment config.")
_BATCHES = flags.DEFINE_integer("batches", 20, "Host batches timed per pipeline setting.")
_STEPS = flags.DEFINE_integer("steps", 10, "Train steps timed.")


def pipeline_rate(config, s, workers: int) -> float:
  from trace_jax.data import setup as data_setup
  config.data.workers = workers
  it = iter(data_setup.train_dataset(config, s.tok, s.model_cfg))
  next(it)  # Start-up (workers, first decode) is not throughput.
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(it)
  return _BATCHES.value * config.data.global_batch / (time.perf_counter() - start)


def step_rate(config, s) -> float:
  import jax

  from trace_jax.data import pipeline
  from trace_jax.data import setup as data_setup
  from trace_jax.train import setup
  from trace_jax.train import state as state_lib
  from trace_jax.train.step import make_train_step
  step_cfg = setup.step_config(config, s.tok)
  step = make_train_step(s.graphdef, step_cfg, s.tx, s.schedule, s.mesh,
                         state_lib.shardings_of(s.state))
  host = next(iter(data_setup.train_dataset(config, s.tok, s.model_cfg)))
  batch = pipeline.to_global(host, s.mesh, s.model_cfg, tuple(config.data.image_grid))
  state = s.state
  with jax.set_mesh(s.mesh):
    state, m = step(state, batch)  # Compile.
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      state, m = step(state, batch)
    jax.block_until_ready(m)
  return _STEPS.value * config.data.global_batch / (time.perf_counter() - start)


def main(argv):
  del argv
  config = _CONFIG.value
  devices.split_cpu(config.cpu_devices)
  from trace_jax.train.loop import build
  s = build(config)
  result = {"config": "demo", "global_batch": config.data.global_batch}
  result["step_examples_per_s"] = step_rate(config, s)
  for workers in (0, 2):
    result[f"pipeline_examples_per_s_workers{workers}"] = pipeline_rate(config, s, workers)
  result["pipeline_over_step"] = (max(result["pipeline_examples_per_s_workers0"],
                                      result["pipeline_examples_per_s_workers2"])
                                  / result["step_examples_per_s"])
  for k, v in result.items():
    print(f"{k:40s} {v:.1f}" if isinstance(v, float) else f"{k:40s} {v}")
  print(json.dumps(result))


if __name__ == "__main__":
  devices.huge_page_malloc()  # As `trace_jax.main` and `trace_jax.eval` run.
  app.run(main)
