"""A demo backbone's reasoning before any retrieval training: its greedy answers to the hard test
queries (tasks 6, 7) of the demo world, put as the plain chat turns it was pretrained on
(`prompts.encode_chat`: the instruction, question or edit and image, no retrieval rule), counted
against the teacher's text. What TRACE writes after fine-tuning is bounded by this
(`tools.demo_errors` reads that from an evaluation); `tools.demo_backbone` prints it.
"""

from __future__ import annotations

import os

from trace_jax import sharding
from trace_jax.data import examples as examples_lib
from trace_jax.data import image as image_lib
from trace_jax.data import prompts, synthetic
from trace_jax.generate import Engine, Request, Sampling
from trace_jax.train import trained


def count(written: list[str], want: list[str]) -> dict[str, int]:
  """Queries, answers right (the last sentence equals the teacher's answer) and whole texts right
  of written texts against the teacher's (tags stripped: "REASONING. ... ANSWER")."""
  return {"queries": len(want),
          "answers_right": sum(w.split(". ")[-1] == t.split(". ")[-1]
                               for w, t in zip(written, want)),
          "texts_right": sum(w == t for w, t in zip(written, want))}


def answers(config, workdir: str, queries: int, max_new_tokens: int) -> dict[int, dict]:
  """`count` per hard task of the run's greedy answers to the first `queries` test queries."""
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
