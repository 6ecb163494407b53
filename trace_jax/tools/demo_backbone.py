"""`python -m trace_jax.tools.demo_backbone --config=configs/demo.py:stage=backbone
--workdir=runs/demo_backbone [--queries=200]`: how well a demo backbone (an LM-only run, before
any retrieval training) reasons on the test split's hard tasks (6, 7).

Each test query is put to the run's newest checkpoint as the plain chat turn it was pretrained on
(`prompts.encode_chat`: the query's instruction, question or edit and image, no retrieval rule)
and answered greedily through the generation engine. Printed per task: how many answers end with
the teacher's answer, and how many equal the teacher's whole text (tags stripped). What TRACE
writes after fine-tuning is bounded by this (`tools.demo_errors` reads that from an evaluation).
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

from trace_jax import devices

_CONFIG = config_flags.DEFINE_config_file("config", None, "The backbone's config[:args].")
_WORKDIR = flags.DEFINE_string("workdir", None, "The backbone run's directory.")
_QUERIES = flags.DEFINE_integer("queries", 200, "Test queries per task (the first N).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Longest answer written.")


def count(written: list[str], want: list[str]) -> dict[str, int]:
  """Queries, answers right (the last sentence equals the teacher's answer) and whole texts right
  of written texts against the teacher's (tags stripped: "REASONING. ... ANSWER")."""
  return {"queries": len(want),
          "answers_right": sum(w.split(". ")[-1] == t.split(". ")[-1]
                               for w, t in zip(written, want)),
          "texts_right": sum(w == t for w, t in zip(written, want))}


def answers(config, workdir: str, queries: int, max_new_tokens: int) -> dict[int, dict]:
  """`count` per hard task of the run's greedy answers to the first `queries` test queries."""
  from trace_jax import sharding
  from trace_jax.data import examples as examples_lib
  from trace_jax.data import image as image_lib
  from trace_jax.data import prompts, synthetic
  from trace_jax.generate import Engine, Request, Sampling
  from trace_jax.train import trained
  with sharding.use_rules(config.sharding_rules or sharding.DEFAULT_RULES):
    model, tok, _, _ = trained.load_model(config, workdir, None)
  root, grid = config.data.root, tuple(config.data.image_grid)
  image_tokens = grid[1] * grid[2] // config.model.vision.spatial_merge_size**2
  end = tok.token_to_id("<|im_end|>")
  files, cot_file = synthetic.split_files(root, "test")
  out = {}
  for task in synthetic.REASON_TASKS:
    exs = examples_lib.load_split(root, [(files[task]["query"], files[task]["pool"])],
                                  os.path.join(root, cot_file), target=examples_lib.LM_TARGET)
    exs = exs[:queries]
    requests = []
    for i, ex in enumerate(exs):
      enc = prompts.encode_chat(tok, ex.query_text, image_tokens, "",
                                config.data.compact_prompts)
      pixels = image_lib.resize_to_grid(os.path.join(root, ex.query_image), grid[1:])[0]
      requests.append(Request(list(enc.ids[:enc.prompt_len]), pixels, 0, i))
    longest = max(len(r.ids) for r in requests)
    engine = Engine(model, capacity=64, max_new_tokens=max_new_tokens,
                    cache_len=longest + max_new_tokens, stop_ids=(end,),
                    sampling=Sampling(0.0, 0, 1.0))
    written = {}
    for f in engine.run(requests, grid=grid, buckets=(longest,), batch_size=32):
      written[f.tag] = tok.decode([t for t in f.tokens if t != end]).strip()
    out[task] = count([written[i] for i in range(len(exs))], [ex.reasoning.strip() for ex in exs])
  return out


def main(argv):
  del argv
  config = _CONFIG.value
  devices.split_cpu(config.cpu_devices)
  result = answers(config, _WORKDIR.value, _QUERIES.value, _MAX_NEW.value)
  for task, c in result.items():
    print(f"task {task}: answers right {c['answers_right']} / {c['queries']}, whole teacher "
          f"text {c['texts_right']} / {c['queries']}")
  print(json.dumps({str(k): v for k, v in result.items()}))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
