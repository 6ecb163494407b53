"""What batching candidates by text length saves on an M-BEIR-shaped union pool: candidates/s
of the encoder as it is (each chunk's batches shortest text first) and as it was (batches in file
order), alternating rounds, in one process.

    python -m benchmarks.pool_order [--root=runs/scale] [--scale=0.001] [--candidates=0]
        [--rounds=2]

The pool is the union test pool of the scale root at `--scale` (`benchmarks/scale_root.py`,
written once under `--root`), `--candidates` of it from the start (0: all), encoded chunk by
chunk (`eval.pool_chunk`) as `eval.pools` does, with the scale model (`configs/scale.py`, made
once by `benchmarks.scale`) and its `eval.prompt_buckets` (64 ... 1280). OVEN, InfoSeek and WebQA
candidates are Wikipedia passages (~5% past 1,024 tokens): in file order a batch takes its longest
row's bucket. Prints candidates/s of each, the best-round ratio and the per-round ratios, the
bucket widths each order ran, then one JSON line. Timing only; the order has a test
(tests/infer/test_encode.py::test_long_and_short_candidates_batch_apart).
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import statistics
import time

import numpy as np
from absl import app, flags

from benchmarks import scale

_SCALE = flags.DEFINE_float("scale", 0.001, "Fraction F of M-BEIR (the root's size).")
_CANDIDATES = flags.DEFINE_integer("candidates", 0, "Candidates encoded per round (0: all).")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Timed rounds per order (alternating).")


def main(argv):
  del argv
  from trace_jax import devices
  from configs import scale as scale_config
  base = scale._ROOT.value  # pylint: disable=protected-access
  tokenizer, run = scale.prepare_model(base)
  root = scale.root_at(base, _SCALE.value)
  config = scale_config.get_config(f"root={root},tokenizer={tokenizer}")
  devices.split_cpu(config.cpu_devices)
  import jax  # After XLA_FLAGS.

  from trace_jax.data import mbeir
  from trace_jax.eval import mbeir_eval, pools
  from trace_jax.generate import batching

  def file_order(items, batch_size):
    """The batches as they were: text-only items first, then file order."""
    order = sorted(range(len(items)), key=lambda i: bool(items[i].image))
    return [np.asarray(order[s:s + batch_size]) for s in range(0, len(order), batch_size)]

  model, tok, _, mesh = mbeir_eval.load_model(config, run)
  path = os.path.join(root, mbeir.UNION_TEST_POOL_FILE)
  items = pools.share_items(path)
  items = list(itertools.islice(items, _CANDIDATES.value) if _CANDIDATES.value else items)
  chunk = config.eval.pool_chunk
  encoders = {name: mbeir_eval.make_encoder(config, model, tok, root, mesh)
              for name in ("by_length", "file_order")}
  old = encoders["file_order"]
  old._batches = lambda items: file_order(items, old.batch_size)  # pylint: disable=protected-access
  widths = {name: collections.Counter() for name in encoders}
  running = [None]
  pack = batching.pack

  def counted_pack(*args, **kwargs):
    packed = pack(*args, **kwargs)
    widths[running[0]][packed.ids.shape[1]] += 1
    return packed
  batching.pack = counted_pack

  def encode(name):
    running[0] = name
    for s in range(0, len(items), chunk):
      jax.block_until_ready(encoders[name].encode_candidates(items[s:s + chunk]).embeddings)

  for name in encoders:  # Compile every bucket.
    encode(name)
  for counts in widths.values():
    counts.clear()
  times = {name: [] for name in encoders}
  for r in range(_ROUNDS.value):
    for name in (list(encoders) if r % 2 else list(encoders)[::-1]):
      start = time.perf_counter()
      encode(name)
      times[name].append(time.perf_counter() - start)
  rate = {name: len(items) / min(t) for name, t in times.items()}
  paired = [b / a for a, b in zip(times["by_length"], times["file_order"])]
  batches = {name: {int(w): n // _ROUNDS.value for w, n in sorted(c.items())}
             for name, c in widths.items()}
  result = {"scale": _SCALE.value, "candidates": len(items), "chunk": chunk,
            "candidates_per_s_by_length": rate["by_length"],
            "candidates_per_s_file_order": rate["file_order"],
            "by_length_over_file_order": rate["by_length"] / rate["file_order"],
            "paired": paired, "paired_median": statistics.median(paired),
            "batches_per_width": batches}
  print(f"{len(items)} union-pool candidates (F={_SCALE.value:g}), best of {_ROUNDS.value}: "
        f"by length {rate['by_length']:.1f}/s, file order {rate['file_order']:.1f}/s, ratio "
        f"{result['by_length_over_file_order']:.2f} (paired rounds: median "
        f"{result['paired_median']:.2f}, {min(paired):.2f}-{max(paired):.2f}); batches per "
        f"width: {batches}")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
