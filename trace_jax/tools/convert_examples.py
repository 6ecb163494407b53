"""`python -m trace_jax.tools.convert_examples`: a split's training examples -> ArrayRecord shards.

    python -m trace_jax.tools.convert_examples --world=DIR --split=train --out=DIR [--num_shards=4]

Builds the `TrainExample`s of every task of the split (`examples.build_examples` over each task's
query file and local pool, with the instruction table and the split's M-BEIR-CoT file) and writes
them with their images inline as a TFDS dataset directory (`trace_jax.data.shards`); prints the
records per task. For now it reads the demo world's layout (`synthetic.generate_world`, located
through its `world.json`), not the real M-BEIR's union files. It tokenizes nothing.
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from trace_jax.data import shards, synthetic
from trace_jax.data.examples import load_split

_WORLD = flags.DEFINE_string("world", None, "M-BEIR-format root written by make_world.")
_SPLIT = flags.DEFINE_string("split", "train", "Split to convert (train or test).")
_OUT = flags.DEFINE_string("out", None, "Dataset directory to create; must not exist.")
_NUM_SHARDS = flags.DEFINE_integer(
  "num_shards", None, f"ArrayRecord files; unset: one per {shards.EXAMPLES_PER_SHARD} examples.")
_NAME = flags.DEFINE_string("name", "trace_examples", "TFDS dataset name (prefixes the shards).")
_INSTRUCTION_MODE = flags.DEFINE_enum("instruction_mode", "first", ["first", "random"],
                                      "Which prompt of the instruction row each query gets.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the 'random' instruction choice.")


def main(argv):
  del argv
  start = time.perf_counter()
  files, cot_file = synthetic.split_files(_WORLD.value, _SPLIT.value)
  examples = load_split(_WORLD.value, [(f["query"], f["pool"]) for f in files.values()],
                        os.path.join(_WORLD.value, cot_file),
                        instruction_mode=_INSTRUCTION_MODE.value, seed=_SEED.value)
  written = shards.write_examples(examples, _WORLD.value, _OUT.value, name=_NAME.value,
                                  split=_SPLIT.value, num_shards=_NUM_SHARDS.value)
  for task, n in written.task_counts.items():
    reasoning = sum(e.is_reasoning for e in examples if e.task_id == task)
    print(f"task {task}: {n} examples ({reasoning} with reasoning)")
  print(f"wrote {sum(written.shard_lengths)} examples in {len(written.shard_lengths)} shards "
        f"({written.num_bytes / 2**20:.1f} MiB) to {written.path} "
        f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  flags.mark_flags_as_required(["world", "out"])
  app.run(main)
