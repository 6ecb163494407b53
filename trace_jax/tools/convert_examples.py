"""`python -m trace_jax.tools.convert_examples`: a split's training examples -> ArrayRecord shards.

    python -m trace_jax.tools.convert_examples --world=DIR --split=train --out=DIR [--num_shards=4]

Builds the `TrainExample`s of every task of the split (`examples.build_examples` over each task's
query file and local pool, with the instruction table and the split's M-BEIR-CoT file) and writes
them with their images inline as a TFDS dataset directory (`trace_jax.data.shards`); prints the
records per task. For now it reads the demo world's layout (`synthetic.generate_world`, located
through its `world.json`), not the real M-BEIR's union files. It tokenizes nothing.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from trace_jax.data import cot as cot_lib
from trace_jax.data import mbeir, shards
from trace_jax.data.examples import TrainExample, build_examples

_WORLD = flags.DEFINE_string("world", None, "M-BEIR-format root written by make_world.")
_SPLIT = flags.DEFINE_string("split", "train", "Split to convert (train or test).")
_OUT = flags.DEFINE_string("out", None, "Dataset directory to create; must not exist.")
_NUM_SHARDS = flags.DEFINE_integer(
  "num_shards", None, f"ArrayRecord files; unset: one per {shards.EXAMPLES_PER_SHARD} examples.")
_NAME = flags.DEFINE_string("name", "trace_examples", "TFDS dataset name (prefixes the shards).")
_INSTRUCTION_MODE = flags.DEFINE_enum("instruction_mode", "first", ["first", "random"],
                                      "Which prompt of the instruction row each query gets.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the 'random' instruction choice.")


def world_files(world: str, split: str) -> tuple[dict[int, dict[str, str]], str]:
  """(task -> {"query", "pool"} paths, CoT path) of a demo world's split, from `world.json`.

  Raises:
    FileNotFoundError: no `world.json` (not a demo world).
    KeyError: the world has no such split.
  """
  summary = os.path.join(world, "world.json")
  if not os.path.isfile(summary):
    raise FileNotFoundError(f"{summary} not found: only the demo world layout is supported")
  with open(summary) as f:
    info = json.load(f)
  if split not in info["files"]:
    raise KeyError(f"{world} has no split {split!r}; it has {sorted(info['files'])}")
  files = {int(task): {k: os.path.join(world, v) for k, v in names.items()}
           for task, names in info["files"][split].items()}
  return dict(sorted(files.items())), os.path.join(world, info["cot"][split])


def load_examples(world: str, split: str, *, instruction_mode: str = "first",
                  seed: int = 0) -> list[TrainExample]:
  """Every task's examples of the split, in task order, with their CoT routes and reasoning."""
  files, cot_file = world_files(world, split)
  instructions = mbeir.load_instructions(mbeir.instructions_file(world))
  cot = cot_lib.read_cot(cot_file)
  out: list[TrainExample] = []
  for paths in files.values():
    out += build_examples(world, paths["query"], mbeir.load_pool(paths["pool"]), instructions,
                          cot, instruction_mode=instruction_mode, seed=seed)
  return out


def main(argv):
  del argv
  start = time.perf_counter()
  examples = load_examples(_WORLD.value, _SPLIT.value, instruction_mode=_INSTRUCTION_MODE.value,
                           seed=_SEED.value)
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
