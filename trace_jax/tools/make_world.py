"""`python -m trace_jax.tools.make_world --out=DIR [--seed=0]`: writes the synthetic shapes world.

Calls `trace_jax.data.synthetic.generate_world` (M-BEIR layout plus the M-BEIR-CoT file) into an
empty `DIR` and prints its summary without the vocabulary list. It trains and evaluates nothing.
"""

from __future__ import annotations

import json
import time

from absl import app, flags

_OUT = flags.DEFINE_string("out", None, "Output folder (the M-BEIR root); must be empty.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every random stream.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 56, "Image side in pixels.")
_N_TRAIN = flags.DEFINE_integer("n_train", 4000, "Train queries in all, spread by --task_mix.")
_N_TEST = flags.DEFINE_integer("n_test", 200, "Test queries per task.")
_TASK_MIX = flags.DEFINE_string("task_mix", "0:1,3:1,6:3,7:3",
                                "task:weight pairs; tasks left out are not generated.")


def parse_task_mix(text: str) -> dict[int, float]:
  """"0:1,3:1,6:3,7:3" -> {0: 1.0, 3: 1.0, 6: 3.0, 7: 3.0}."""
  pairs = (item.split(":") for item in text.split(",") if item.strip())
  return {int(task): float(weight) for task, weight in pairs}


def main(argv):
  del argv
  from trace_jax.data.synthetic import generate_world

  start = time.perf_counter()
  summary = generate_world(_OUT.value, seed=_SEED.value, image_size=_IMAGE_SIZE.value,
                           n_train=_N_TRAIN.value, n_test=_N_TEST.value,
                           task_mix=parse_task_mix(_TASK_MIX.value))
  shown = {k: v for k, v in summary.items() if k != "vocabulary"}
  shown["vocabulary_size"] = len(summary["vocabulary"])
  print(json.dumps(shown, indent=1))
  print(f"wrote {_OUT.value} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  flags.mark_flags_as_required(["out"])
  app.run(main)
