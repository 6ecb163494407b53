"""From an experiment config to the training data: the tokenizer, the examples, the Grain dataset.

`config.data.root` is an M-BEIR-format folder (the real M-BEIR, or the generated demo world, which
is created there when `data.generate_world` is set and the folder is absent). `data.train_files`
pairs query files with their candidate pools; `data.cot_file` gives the routes and reasoning.
The tokenizer is `data.tokenizer` (a Hugging Face `tokenizer.json` or a SentencePiece `.model`),
or for the demo a SentencePiece model trained on the world's text. It does not build the model.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax

from trace_jax.data import prompts, shards, synthetic
from trace_jax.data.examples import LM_TARGET, TrainExample, load_split
from trace_jax.data.pipeline import Buckets, group_by_task, make_dataset
from trace_jax.data.tokenizer import EOR_TOKEN, HFTokenizer, SentencePieceTokenizer, Tokenizer
from trace_jax.data.transforms import Shapes, ToArrays
from trace_jax.model.config import ModelConfig

DEMO_TOKENIZER = "tokenizer.model"
# The demo tokenizer with the end-of-reasoning marker as one more symbol (a separate file: the
# default one, and every run trained with it, stay unchanged).
DEMO_MARKER_TOKENIZER = "tokenizer_eor.model"
# The demo world's tokenizer for a backbone (`data.target="lm"`): no `<|emb|>`, which
# fine-tuning appends to it (`SentencePieceTokenizer.from_file`).
DEMO_BASE_TOKENIZER = "tokenizer_base.model"
# Data fields whose effect ArrayRecord shards fix at conversion, with their defaults.
SHARD_FIXED = {"target": "full", "cand_target": "none", "reasoning_marker": False,
               "hard_negatives": "none"}


def ensure_world(data) -> None:
  """Generates the demo world at `data.root` when asked to and it is not there yet."""
  if data.generate_world and not os.path.exists(os.path.join(data.root, "world.json")):
    synthetic.generate_world(data.root, seed=data.world_seed, n_train=data.world_train,
                             n_test=data.world_test, image_size=data.world_image_size)


def marker(data) -> str:
  """The end-of-reasoning token the targets carry (`data.reasoning_marker`), or ""."""
  return EOR_TOKEN if data.reasoning_marker else ""


def marker_id(data, tok: Tokenizer) -> int:
  """The end-of-reasoning token's id in `tok` when the targets carry it, else -1."""
  return tok.token_to_id(EOR_TOKEN) if data.reasoning_marker else -1


def make_tokenizer(data) -> Tokenizer:
  """The configured tokenizer, or the demo world's SentencePiece model (trained once); with
  `data.reasoning_marker`, `EOR_TOKEN` is one token of it (appended to a given Hugging Face or
  SentencePiece tokenizer like `<|emb|>`; trained into the demo world's)."""
  extra = (EOR_TOKEN,) if data.reasoning_marker else ()
  lm = data.target == LM_TARGET  # A backbone's tokenizer: `<|emb|>` comes with TRACE.
  path = data.tokenizer
  if path.endswith(".json"):
    return HFTokenizer.from_dir(os.path.dirname(path), extra_special=extra)
  if path:  # A released (backbone's) tokenizer: the tokens TRACE needs are added to it.
    return SentencePieceTokenizer.from_file(path, add_emb=not lm, extra_special=extra)
  name = DEMO_BASE_TOKENIZER if lm else DEMO_MARKER_TOKENIZER if extra else DEMO_TOKENIZER
  model = os.path.join(data.root, name)
  if os.path.exists(model):
    return _require(SentencePieceTokenizer.from_file(model, add_emb=not lm), extra, model)
  with open(os.path.join(data.root, "world.json")) as f:
    vocabulary = json.load(f)["vocabulary"]
  texts = [" ".join(vocabulary), prompts.SYSTEM, prompts.QUERY_RULE, prompts.CANDIDATE_RULE,
           prompts.COMPACT_QUERY_RULE, prompts.COMPACT_CANDIDATE_RULE,
           "system\nuser\nassistant\n"] + list(vocabulary)
  symbols = (prompts.SPECIAL if lm else prompts.required_tokens()) + extra
  return SentencePieceTokenizer.train(texts * 8, model[:-len(".model")], data.tokenizer_vocab,
                                      user_symbols=symbols, add_emb=not lm)


def _require(tok: Tokenizer, tokens, path: str) -> Tokenizer:
  for token in tokens:
    try:
      tok.token_to_id(token)
    except KeyError:
      raise ValueError(f"{path}: {token!r} is not one token of this tokenizer (needed by "
                       "data.reasoning_marker); retrain it with the token as a user "
                       "symbol") from None
  return tok


def with_token_ids(model_cfg: ModelConfig, tok: Tokenizer) -> ModelConfig:
  """The model's special-token ids taken from the tokenizer (vocab must be large enough)."""
  if tok.vocab_size > model_cfg.text.vocab_size:
    raise ValueError(f"tokenizer has {tok.vocab_size} ids, model.text.vocab_size is only "
                     f"{model_cfg.text.vocab_size}")
  return dataclasses.replace(
    model_cfg, image_token_id=tok.token_to_id("<|image_pad|>"),
    vision_start_token_id=tok.token_to_id("<|vision_start|>"),
    vision_end_token_id=tok.token_to_id("<|vision_end|>"))


def load_examples(data) -> list[TrainExample]:
  """Training examples of every (query file, pool file) pair, with routes from the CoT file."""
  cot_file = os.path.join(data.root, data.cot_file) if data.cot_file else None
  return load_split(data.root, data.train_files, cot_file, instruction_mode=data.instruction_mode,
                    seed=data.seed, target=data.target, cand_target=data.cand_target,
                    marker=marker(data), cot_missing=data.cot_missing,
                    hard_negatives=data.hard_negatives,
                    cot_drop_datasets=tuple(data.get("cot_drop_datasets", ())))


def check_shards_targets(data) -> None:
  """ArrayRecord shards hold the targets written when they were converted: the fields that would
  change them must keep their defaults (else they would be ignored without a word)."""
  changed = [f"data.{k}={getattr(data, k)!r}" for k, default in SHARD_FIXED.items()
             if getattr(data, k) != default]
  if changed:
    raise ValueError(f"data.shards_dir={data.shards_dir!r} holds the targets fixed at conversion "
                     f"(tools/convert_examples); {', '.join(changed)} needs the M-BEIR files "
                     "(unset data.shards_dir)")


def bucket_sizes(data) -> Buckets:
  """Padding buckets: `query_len` / `cand_len` and the smaller sizes listed with them.

  Raises:
    ValueError: a listed size is above its side's length: `cand_len` is the candidate-length
      policy's limit (`prompts.candidate_limits`), the longest candidate in training and in
      evaluation, so no bucket may exceed it.
  """
  out = []
  for side in ("query", "cand"):
    sizes, longest = tuple(getattr(data, f"{side}_buckets")), getattr(data, f"{side}_len")
    if any(s > longest or s < 1 for s in sizes):
      raise ValueError(f"data.{side}_buckets={sizes} must lie in [1, data.{side}_len={longest}] "
                       f"(set data.{side}_buckets to the smaller sizes)")
    out.append(tuple(sorted({*sizes, longest})))
  return Buckets(*out)


def make_transform(data, tok: Tokenizer, model_cfg: ModelConfig) -> ToArrays:
  """The per-example transform of a config's `data` section: prompts, the query limits, and the
  candidate-length policy (`prompts.candidate_limits(data)`, which evaluation applies too)."""
  buckets = bucket_sizes(data)
  shapes = Shapes(max(buckets.query), max(buckets.cand), tuple(data.image_grid))
  limits = prompts.candidate_limits(data)  # max_len is cand_len: no bucket lies above it.
  return ToArrays(tok, model_cfg, shapes, data.root, on_bad_example=data.on_bad_example,
                  compact_prompts=data.compact_prompts,
                  cand_may_reason=data.cand_target != "none",
                  query_text_tokens=data.query_text_tokens, cand_text_tokens=limits.text_tokens,
                  lm_only=data.target == LM_TARGET)


def train_dataset(config, tok: Tokenizer, model_cfg: ModelConfig):
  """This process's endless stream of padded host batches."""
  data = config.data
  n, p = jax.process_count(), jax.process_index()
  if data.global_batch % n:
    raise ValueError(f"data.global_batch={data.global_batch} does not split over {n} processes")
  num_shards = data.data_shards or n
  if num_shards % n:
    raise ValueError(f"data.data_shards={num_shards} is not a multiple of {n} processes")
  per_process = num_shards // n
  buckets = bucket_sizes(data)
  to_arrays = make_transform(data, tok, model_cfg)
  weights = {int(k): float(v) for k, v in (data.task_weights or {}).items()}
  if data.shards_dir:  # ArrayRecord shards with the images inline (tools/convert_examples).
    check_shards_targets(data)
    by_task = shards.split_by_task(shards.ExampleSource(data.shards_dir))
  else:
    by_task = group_by_task(load_examples(data))
  return make_dataset(by_task, to_arrays,
                      buckets,
                      batch_size=data.global_batch // n, seed=data.seed,
                      task_weights=weights or None, one_task_per_batch=data.one_task_per_batch,
                      shards=range(p * per_process, (p + 1) * per_process),
                      num_shards=num_shards, workers=data.workers,
                      max_skip_fraction=data.max_skip_fraction, skip_window=data.skip_window)
