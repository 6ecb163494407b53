"""The generation engine against transformers' `generate`, side by side, and what its batching
and prefix cache buy.

    python -m benchmarks.generate [--rounds=3] [--batch=8] [--prompt=64] [--new=64]

Model: the train-step benchmark's (`benchmarks/train_step.py`: Qwen2.5-VL-shaped, decoder width
512, 8 layers, 8 heads / 2 KV heads, MLP 1536, vocab 4096), random weights written once with
`save_pretrained` and loaded by both sides in float32. Measured in one run, rounds alternating,
each side keeping its best round:

- `tokens_per_s` / `ref_tokens_per_s`: `--batch` prompts of `--prompt` tokens, greedy,
  `--new` new tokens each (no stop id: both write every token), prefill included; trace_jax's
  `generate` against transformers' `generate` (`ratio`).
- `continuous_over_static`: 32 requests whose output lengths are drawn from 8-128 tokens (as
  reasoning lengths vary), through `--batch` slots: continuous batching (a finished row's slot
  takes the next prompt) against static batching (batches of `--batch` run until their longest
  row ends), tokens/s.
- `prefix_speedup`: the same prompts as 192 tokens of shared template + 32 of their own, 8 new
  tokens each: prefilled against the template's cache, computed once, against whole.
- `bandwidth_fraction`: the time to read the weights and the KV cache once at this machine's
  measured memory bandwidth (a large array copy), over the measured time of one decode step of
  `--batch` rows (decode is bandwidth-bound; 1.0 is the physical limit).
Last line: one JSON object. Timing only; no test.
"""

from __future__ import annotations

import json
import tempfile
import time

import numpy as np
from absl import app, flags

from trace_jax import devices

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds per measurement (best kept).")
_BATCH = flags.DEFINE_integer("batch", 8, "Prompts per batch / engine slots.")
_PROMPT = flags.DEFINE_integer("prompt", 64, "Prompt tokens.")
_NEW = flags.DEFINE_integer("new", 64, "New tokens per prompt.")


def best(fn, rounds):
  fn()  # Compile / warm up.
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def memory_bandwidth() -> float:
  """Bytes/s of a large array copy (read + write), best of five."""
  a = np.ones(1 << 27, np.float32)  # 512 MiB.
  b = np.empty_like(a)
  times = []
  for _ in range(5):
    start = time.perf_counter()
    np.copyto(b, a)
    times.append(time.perf_counter() - start)
  return 2 * a.nbytes / min(times)


def main(argv):
  del argv
  devices.split_cpu(1)
  import jax
  import torch
  from flax import nnx

  from benchmarks import train_step
  from trace_jax.generate import Engine, Request, generate
  from trace_jax.model.hf_io import load_hf

  batch, prompt, new = _BATCH.value, _PROMPT.value, _NEW.value
  hf_dir = tempfile.mkdtemp(prefix="bench_generate_")
  import transformers
  torch.manual_seed(0)
  ref = transformers.Qwen2_5_VLForConditionalGeneration(train_step.hf_config()).eval()
  ref.save_pretrained(hf_dir)
  model, cfg = load_hf(hf_dir, dtype="float32")
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 3900, (batch, prompt)).astype(np.int32)
  mask = np.ones_like(ids)

  def ours():
    out = generate(model, ids, mask, max_new_tokens=new, chunk=16)
    assert all(len(r) == new for r in out)

  def theirs():
    with torch.no_grad():
      out = ref.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, pad_token_id=0)
    assert out.shape[1] == prompt + new

  ours(), theirs()  # Compile / warm up.
  t_ours, t_ref = [], []
  for r in range(_ROUNDS.value):  # Alternating, each side first every other round.
    for fn, times in ((ours, t_ours), (theirs, t_ref))[::1 if r % 2 else -1]:
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
  tokens = batch * new
  result = {"tokens_per_s": tokens / min(t_ours), "ref_tokens_per_s": tokens / min(t_ref)}
  result["ratio"] = result["tokens_per_s"] / result["ref_tokens_per_s"]

  lengths = rng.integers(8, 129, 32)
  reqs = [Request(list(rng.integers(0, 3900, prompt)), tag=i, max_new_tokens=int(n))
          for i, n in enumerate(lengths)]
  kw = dict(capacity=batch, cache_len=prompt + 128, max_new_tokens=128, chunk=8)

  def continuous():
    list(Engine(model, **kw).run(reqs, buckets=(prompt,), batch_size=batch))

  def static():
    engine = Engine(model, **kw)
    for start in range(0, len(reqs), batch):  # Each batch runs to its longest row.
      list(engine.run(reqs[start:start + batch], buckets=(prompt,), batch_size=batch))

  t_cont, t_static = best(continuous, _ROUNDS.value), best(static, _ROUNDS.value)
  result["continuous_over_static"] = t_static / t_cont

  template = list(rng.integers(0, 3900, 192))
  shared = [Request(template + list(rng.integers(0, 3900, 32)), tag=i) for i in range(32)]
  pkw = dict(capacity=batch, cache_len=256 + 8, max_new_tokens=8, chunk=8)
  t_whole = best(lambda: list(Engine(model, **pkw).run(shared, buckets=(224,), batch_size=batch)),
                 _ROUNDS.value)
  t_prefix = best(lambda: list(Engine(model, **pkw).run(shared, buckets=(32,), batch_size=batch,
                                                        prefix=template)), _ROUNDS.value)
  result["prefix_speedup"] = t_whole / t_prefix

  # One decode step of `batch` rows at the end of a `prompt + new` context.
  engine = Engine(model, capacity=batch, cache_len=prompt + new + 64, max_new_tokens=64,
                  chunk=32)
  steady = [Request(list(rng.integers(0, 3900, prompt + new)), tag=i, max_new_tokens=64)
            for i in range(batch)]

  def decode_steps():
    list(engine.run(steady, buckets=(prompt + new,), batch_size=batch))

  t_decode = best(decode_steps, _ROUNDS.value)
  first_only = [Request(r.ids, tag=r.tag) for r in steady]  # The same prefill, one token.
  t_prefill = best(lambda: list(Engine(model, capacity=batch, cache_len=prompt + new + 1,
                                       max_new_tokens=1).run(first_only, buckets=(prompt + new,),
                                                             batch_size=batch)), _ROUNDS.value)
  step_s = (t_decode - t_prefill) / 63
  params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model.decoder))
               ) + model.embed[...].nbytes  # The decoder and the (tied or not) unembedding.
  t = cfg.text
  slots = prompt + new + 64  # Attention reads every slot of the row's cache, masked or not.
  kv = 2 * t.num_layers * batch * t.num_kv_heads * slots * t.head_dim * 4
  bandwidth = memory_bandwidth()
  result.update(decode_step_ms=1e3 * step_s, weight_bytes=int(params), kv_bytes=int(kv),
                memory_bandwidth_gb_s=bandwidth / 1e9,
                bandwidth_fraction=(params + kv) / bandwidth / step_s)
  print(f"engine {result['tokens_per_s']:.0f} tok/s, transformers {result['ref_tokens_per_s']:.0f} "
        f"tok/s: {result['ratio']:.2f}x; continuous/static {result['continuous_over_static']:.2f}; "
        f"prefix {result['prefix_speedup']:.2f}x; decode step {1e3 * step_s:.1f} ms, "
        f"bandwidth fraction {result['bandwidth_fraction']:.2f} "
        f"({bandwidth / 1e9:.1f} GB/s)")
  print(json.dumps(result))


if __name__ == "__main__":
  devices.huge_page_malloc()
  app.run(main)
