"""Host memory of the teacher's generate phase: peak resident set size over N reason queries of
the demo world, images at the teacher's default 16x16 grid (1.2 MB of float32 pixels each).

    python benchmarks/teach_memory.py --queries=1000 [--world=DIR] [--new=2]

The teacher is a tiny random Qwen2.5-VL written with `save_pretrained` next to a small BPE
tokenizer trained here on the world's text (what it writes does not matter: the images'
memory does). Routes by dataset (the demo's tasks 6 and 7 reason), then `phases.generate` over
the first `--queries` of them. Prints the peak RSS before and after the phase and its growth;
last line: one JSON object. Run as a script (not `-m`) with PYTHONPATH pointing at the checkout
to measure, so another checkout's `trace_jax` can be measured with the same file. Memory only;
no test.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time

import tokenizers
import transformers
from absl import app, flags
from tokenizers import decoders, models, pre_tokenizers, trainers

_QUERIES = flags.DEFINE_integer("queries", 1000, "Reason queries generated for.")
_WORLD = flags.DEFINE_string("world", "", "Demo world (written there if absent; default: tmp).")
_NEW = flags.DEFINE_integer("new", 2, "New tokens per query.")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>")


def peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB.


def write_teacher(path: str, texts) -> None:
  """A byte-level BPE tokenizer over `texts` with Qwen's specials, and a random tiny model."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
    vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t in SPECIALS])
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  ids = dict(image_token_id=tok.token_to_id("<|image_pad|>"),
             video_token_id=tok.token_to_id("<|endoftext|>"),
             vision_start_token_id=tok.token_to_id("<|vision_start|>"),
             vision_end_token_id=tok.token_to_id("<|vision_end|>"))
  text = dict(vocab_size=tok.get_vocab_size(), bos_token_id=None,
              eos_token_id=tok.token_to_id("<|im_end|>"), hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                               "rope_theta": 10000.0})
  vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                fullatt_block_indexes=[1], window_size=112)
  cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
  transformers.Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(path)


def main(argv):
  del argv
  from configs import teach as teach_config
  from trace_jax.data import synthetic
  from trace_jax.teach import phases
  from trace_jax.teach.items import load_items
  from trace_jax.teach.loading import load_teacher

  tmp = tempfile.mkdtemp()
  world = _WORLD.value or os.path.join(tmp, "world")
  if not os.path.exists(os.path.join(world, "world.json")):
    synthetic.generate_world(world, n_train=_QUERIES.value * 4 // 3 + 64, n_test=2)
  config = teach_config.get_config("world=demo,dtype=float32")
  config.generate.max_new_tokens = _NEW.value
  config.generate.prompt_buckets = (256,)
  config.progress_seconds = 1e9
  items = load_items(world, config.files)
  reason = [it for it in items if it.task_id in (6, 7)][:_QUERIES.value]
  hf_dir = os.path.join(tmp, "hf")
  write_teacher(hf_dir, [it.instruction + " " + it.query_text for it in items]
                + [str(t) for t in config.templates.values()])
  teacher = load_teacher(hf_dir, config, world)
  out = os.path.join(tmp, "out")
  phases.assess(config, None, reason, out)
  before, start = peak_mb(), time.perf_counter()
  phases.generate(config, teacher, reason, out)
  after, seconds = peak_mb(), time.perf_counter() - start
  written = sum(1 for _ in phases.shards.read(out, "generated"))
  print(f"{written} queries generated in {seconds:.1f} s; peak RSS {before:.0f} MB before the "
        f"phase, {after:.0f} MB after (+{after - before:.0f} MB)")
  print(json.dumps({"queries": written, "grid": list(teacher.grid), "peak_rss_mb_before":
                    round(before), "peak_rss_mb_after": round(after),
                    "growth_mb": round(after - before), "seconds": round(seconds, 1)}))


if __name__ == "__main__":
  app.run(main)
