"""What skipping the vision tower saves on a text-only pool: candidates/s with and without it.

    python -m benchmarks.text_only_pool [--config=configs/demo.py] [--candidates=512]
        [--rounds=5] [--config.data.image_grid=(1,16,16)]

Text candidates (M-BEIR's tasks 1, 3 and 6: WebQA, the captions of MSCOCO / VisualNews /
Fashion200K, OVEN and InfoSeek's Wikipedia texts) have no image. The encoder batches them apart
from image items and runs no vision tower for them; before, every row ran the tower on a blank
image. This times both on the demo world's task-3 pool (captions), the old way reproduced by an
encoder that packs blank pixels into every batch, alternating rounds; it prints candidates/s of
each, the best-round ratio and the median and range of the per-round ratios, then one JSON line.
The model is the config's, freshly initialised (timing does not need trained weights); the
saving grows with the image grid (`--config.data.image_grid`). Timing only; no test.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from trace_jax import devices

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Experiment config.")
_CANDIDATES = flags.DEFINE_integer("candidates", 512, "Text candidates encoded per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds per encoder (alternating).")


def main(argv):
  del argv
  config = _CONFIG.value
  devices.split_cpu(config.cpu_devices)
  import jax  # After XLA_FLAGS.
  from flax import nnx

  from trace_jax.data import mbeir
  from trace_jax.data import setup as data_setup
  from trace_jax.eval import mbeir_eval
  from trace_jax.infer.encode import Encoder, Item
  from trace_jax.train.loop import build

  class BlankImages(Encoder):
    """The encoder as it was: every batch carries pixels, blank for rows without an image."""

    def _pack(self, seqs, items, grow=False, images=None):
      packed = super()._pack(seqs, items, grow, images)
      if packed.pixels is not None:
        return packed
      blank = np.zeros((packed.ids.shape[0], self.patches, self.model.cfg.vision.patch_dim),
                       np.float32)
      return dataclasses.replace(packed, pixels=blank)

  data_setup.ensure_world(config.data)
  s = build(config, mbeir_eval.eval_mesh(config))
  model = nnx.merge(s.graphdef, s.state.params["model"], s.state.frozen)
  task = next(t for t in mbeir_eval.eval_tasks(config, config.data.root) if t.task_id == 3)
  pool = mbeir.load_pool(f"{config.data.root}/{task.pool_file}")
  texts = [c.text for c in pool.values()]
  items = [Item(texts[i % len(texts)], None, f"text:{i}") for i in range(_CANDIDATES.value)]
  kw = dict(image_grid=config.data.image_grid, root=config.data.root,
            batch_size=config.eval.batch_size, prompt_buckets=config.eval.prompt_buckets,
            compact_prompts=config.data.compact_prompts, mesh=s.mesh)
  encoders = {"skip_vision": Encoder(model, s.tok, **kw), "blank_images": BlankImages(
    model, s.tok, **kw)}
  times = {name: [] for name in encoders}
  for enc in encoders.values():  # Compile.
    enc.encode_candidates(items[:kw["batch_size"]])
  for r in range(_ROUNDS.value):
    for name in (list(encoders) if r % 2 else list(encoders)[::-1]):
      start = time.perf_counter()
      jax.block_until_ready(encoders[name].encode_candidates(items).embeddings)
      times[name].append(time.perf_counter() - start)
  rate = {name: len(items) / min(t) for name, t in times.items()}
  paired = [b / a for a, b in zip(times["skip_vision"], times["blank_images"])]
  result = {"candidates": len(items), "image_grid": list(config.data.image_grid),
            "candidates_per_s_skip_vision": rate["skip_vision"],
            "candidates_per_s_blank_images": rate["blank_images"],
            "skip_over_blank": rate["skip_vision"] / rate["blank_images"],
            "skip_over_blank_paired": paired,
            "skip_over_blank_paired_median": statistics.median(paired)}
  print(f"{len(items)} text candidates, image grid {tuple(config.data.image_grid)}, best of "
        f"{_ROUNDS.value}: skip vision {rate['skip_vision']:.1f}/s, blank images "
        f"{rate['blank_images']:.1f}/s, ratio {result['skip_over_blank']:.2f} (paired rounds: "
        f"median {result['skip_over_blank_paired_median']:.2f}, "
        f"{min(paired):.2f}-{max(paired):.2f})")
  print(json.dumps(result))


if __name__ == "__main__":
  devices.huge_page_malloc()
  app.run(main)
