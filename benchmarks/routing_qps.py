"""Does implicit routing cost throughput? Adaptive and always-reason QPS over direct QPS.

    python -m benchmarks.routing_qps [--config=configs/demo.py] [--workdir=runs/demo]
        [--queries=128] [--rounds=3]

Needs a checkpoint that has learned to route: by default the demo's (run the README's first
command). Each workload mixes the demo world's test queries: simple ones (tasks 0 and 3: caption
-> image, image -> caption) and hard ones (task 6 questions, task 7 edits) in the share of the
paper's examples: `mscoco_like` has 96% simple queries, `cirr_like` 62% hard ones. The three
encoder modes (`infer/encode.py`) encode the same queries, alternating, each keeping its best of
`--rounds` (`mbeir_eval.mode_times`). Per workload it prints the rates, the share of queries the
adaptive encoder sent to reasoning, and one JSON line
`{"workload", "adaptive_over_direct", "always_reason_over_direct", ...}`; the headline ratios are
of the best rounds. The paired ratios (each round's direct time over its adaptive time, two
passes of the same round) show how far the machine's noise moves the ratio within the run: their
median and range are printed, and listed in the JSON. Timing only; no test.
"""

from __future__ import annotations

import json
import os
import random
import statistics

from absl import app, flags
from ml_collections import config_flags

from trace_jax import devices
from trace_jax.eval.demo_criteria import HARD, SIMPLE

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "The run's config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Training workdir with a checkpoint.")
_QUERIES = flags.DEFINE_integer("queries", 128, "Queries per workload.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds per mode (the best is kept).")

# Share of hard (reasoning) queries: MSCOCO's 4% and CIRR's 62% (TRACE.md, routing rates).
WORKLOADS = {"mscoco_like": 0.04, "cirr_like": 0.62}


def workload(items_by_task: dict[int, list], hard_share: float, n: int, seed: int) -> list:
  """`n` queries, round(n * hard_share) of them from the hard tasks, the rest simple, shuffled."""
  rng = random.Random(seed)
  n_hard = round(n * hard_share)
  simple = [it for t in SIMPLE for it in items_by_task[t]]
  hard = [it for t in HARD for it in items_by_task[t]]
  if n_hard > len(hard) or n - n_hard > len(simple):
    raise ValueError(f"the world has {len(hard)} hard and {len(simple)} simple test queries; "
                     f"lower --queries={n}")
  chosen = rng.sample(hard, n_hard) + rng.sample(simple, n - n_hard)
  rng.shuffle(chosen)
  return chosen


def main(argv):
  del argv
  config = _CONFIG.value
  devices.split_cpu(config.cpu_devices)
  from trace_jax.eval import mbeir_eval
  root = config.data.root
  if not os.path.isdir(os.path.join(_WORKDIR.value, "checkpoints")):
    raise SystemExit(f"error: no checkpoint in {_WORKDIR.value}; train one first "
                     f"(python -m trace_jax.main --config=configs/demo.py "
                     f"--workdir={_WORKDIR.value})")
  model, tok, step, mesh = mbeir_eval.load_model(config, _WORKDIR.value)
  encoder = mbeir_eval.make_encoder(config, model, tok, root, mesh)
  items_by_task = {t.task_id: mbeir_eval.query_items(t, root)[1]
                   for t in mbeir_eval.eval_tasks(config, root)}
  print(f"checkpoint step {step} of {_WORKDIR.value}; {_QUERIES.value} queries per workload, "
        f"batch {config.eval.batch_size}, best of {_ROUNDS.value} rounds")
  lines = []
  for name, hard_share in WORKLOADS.items():
    items = workload(items_by_task, hard_share, _QUERIES.value, config.seed)
    times = mbeir_eval.mode_times(encoder, items, _ROUNDS.value)
    qps = mbeir_eval.best_qps(times, len(items))
    paired = [d / a for d, a in zip(times["direct"], times["adaptive"])]
    routed = float(encoder.encode_queries(items, "adaptive").reasoned.mean())
    result = {"workload": name, "adaptive_over_direct": qps["adaptive"] / qps["direct"],
              "always_reason_over_direct": qps["always_reason"] / qps["direct"],
              "hard_share": hard_share, "reason_rate": routed,
              **{f"qps_{mode}": rate for mode, rate in qps.items()},
              "adaptive_over_direct_paired": paired,
              "adaptive_over_direct_paired_median": statistics.median(paired)}
    print(f"{name:12s} hard {hard_share:4.0%}  routed to reasoning {routed:5.1%}  "
          + "  ".join(f"{m} {r:7.1f} q/s" for m, r in qps.items())
          + f"  adaptive/direct {result['adaptive_over_direct']:.2f} (paired rounds: median "
          f"{result['adaptive_over_direct_paired_median']:.2f}, "
          f"{min(paired):.2f}-{max(paired):.2f})")
    lines.append(json.dumps(result))
  for line in lines:
    print(line)


if __name__ == "__main__":
  devices.huge_page_malloc()  # As `trace_jax.main` and `trace_jax.eval` run.
  app.run(main)
