"""A trained TRACE model -> a Hugging Face directory that transformers loads and embeds with.

`export` folds the LoRA adapters into the base kernels (on a shallow copy: the caller's model
keeps its adapters), writes the weights and config.json with `hf_io.save_hf`, the tokenizer with
`<|emb|>`, `trace_embedding.json` (the readout as data) and a README.md that shows how to build
the prompt and read the embedding with transformers. It does not restore checkpoints (see
`trace_jax/tools/export_hf.py`) and does not run transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap

from flax import nnx

from trace_jax.data import prompts
from trace_jax.data.tokenizer import (EMB_TOKEN, SENTENCEPIECE_FILE, HFTokenizer,
                                      SentencePieceTokenizer, Tokenizer)
from trace_jax.model import token_rows
from trace_jax.model.hf_io import save_hf
from trace_jax.model.lora import merge_lora
from trace_jax.model.qwen_vl import QwenVL

README_FILE = "README.md"
EMBEDDING_FILE = "trace_embedding.json"
# Processor files of the base model that transformers reads next to the weights.
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja", "generation_config.json")
# Which position's last-layer state is the embedding; the keys are `model.readout.READOUTS`.
READOUTS = {
  "pre_token": "the token just before the first `<|emb|>` (for candidates and direct queries: the "
               "last prompt token, `\\n` after `assistant`)",
  "emb": "the first `<|emb|>` token itself",
  "end_of_reasoning": "the last end-of-reasoning token (id `eor_token_id`) before the first "
                      "`<|emb|>`, or the token just before `<|emb|>` when there is none",
}


def merged_copy(model: QwenVL) -> QwenVL:
  """`model` with every LoRA adapter folded into its base kernel and the added tokens' trained
  rows written into the vocabulary (`token_rows`); `model` itself is unchanged.

  `nnx.clone` makes new Variables that share the (immutable) arrays, so only the merged kernels
  take new memory.
  """
  return token_rows.merge(merge_lora(nnx.clone(model)))


def export(model: QwenVL, out_dir: str, *, tokenizer: Tokenizer | None = None,
           dtype: str = "float32", base_config: dict | None = None, readout: str = "pre_token",
           eor_token_id: int = -1, compact_prompts: bool = False,
           cand_reasoning: bool = False, processor_dir: str | None = None) -> str:
  """Writes `model` (LoRA merged) as a Hugging Face directory with a README on reading embeddings.

  Args:
    model: a trace_jax model, with or without LoRA adapters; it is not modified.
    out_dir: output directory (created; a checkpoint already there is replaced).
    tokenizer: written next to the weights: an `HFTokenizer` as tokenizer.json (+ its
      tokenizer_config.json), a `SentencePieceTokenizer` as `sentencepiece.model` (not a
      transformers tokenizer). None writes no tokenizer.
    dtype: dtype of the written tensors and of config.json's `dtype`.
    base_config: the base model's config.json dict; fields trace_jax does not set are kept.
    readout: the embedding readout the model was trained with (`loss.readout`).
    eor_token_id: the end-of-reasoning token id, for `readout="end_of_reasoning"`.
    compact_prompts: whether training used `data.compact_prompts` (changes the prompt text).
    cand_reasoning: whether candidates were trained to write text first (`data.cand_target` not
      "none"): their prompt allows it and they are embedded like queries.
    processor_dir: a directory (the base model's) whose processor files are copied, if present.

  Returns:
    `out_dir`.
  """
  if readout not in READOUTS:
    raise ValueError(f"readout={readout!r}; expected one of {tuple(READOUTS)}")
  if readout == "end_of_reasoning" and eor_token_id < 0:
    raise ValueError("readout='end_of_reasoning' needs eor_token_id")
  vocab = model.cfg.text.vocab_size
  if tokenizer is not None and tokenizer.vocab_size > vocab:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary has "
                     f"only {vocab} rows")
  save_hf(merged_copy(model), out_dir, dtype=dtype, base_config=base_config)
  _copy_processor_files(processor_dir, out_dir)
  tok_kind = _save_tokenizer(tokenizer, out_dir)
  info = {"readout": readout, "readout_position": READOUTS[readout], "emb_token": EMB_TOKEN,
          "emb_token_id": None if tokenizer is None else tokenizer.emb_id,
          "eor_token_id": eor_token_id if readout == "end_of_reasoning" else None,
          "hidden_state": "hidden_states[-1] (after the final RMSNorm)", "normalize": "l2",
          "compact_prompts": compact_prompts, "cand_reasoning": cand_reasoning,
          "tokenizer": tok_kind}
  with open(os.path.join(out_dir, EMBEDDING_FILE), "w") as f:
    json.dump(info, f, indent=2)
    f.write("\n")
  with open(os.path.join(out_dir, README_FILE), "w", encoding="utf-8") as f:
    f.write(readme(info, model.cfg.family))
  return out_dir


def _copy_processor_files(src: str | None, out_dir: str) -> None:
  if src is None:
    return
  for name in PROCESSOR_FILES:
    path = os.path.join(src, name)
    if os.path.isfile(path):
      shutil.copy(path, os.path.join(out_dir, name))


def _save_tokenizer(tokenizer: Tokenizer | None, out_dir: str) -> str | None:
  """Writes the tokenizer; returns its kind ("hf", "sentencepiece") or None."""
  if tokenizer is None:
    return None
  kinds = {HFTokenizer: "hf", SentencePieceTokenizer: "sentencepiece"}
  if type(tokenizer) in kinds:
    tokenizer.save(out_dir)
    return kinds[type(tokenizer)]
  raise TypeError(f"cannot export a tokenizer of type {type(tokenizer).__name__}")


def prompt_text(candidate: bool, compact: bool, cand_reasoning: bool = False) -> str:
  """The prompt TRACE trains with, as text; `{text}` marks the instruction + query (or the
  candidate text) and `{image}` the optional `<|vision_start|><|image_pad|><|vision_end|>`."""
  if candidate and cand_reasoning:
    rule = prompts.COMPACT_CANDIDATE_REASON_RULE if compact else prompts.CANDIDATE_REASON_RULE
  elif candidate:
    rule = prompts.COMPACT_CANDIDATE_RULE if compact else prompts.CANDIDATE_RULE
  else:
    rule = prompts.COMPACT_QUERY_RULE if compact else prompts.QUERY_RULE
  system = "" if compact else f"<|im_start|>system\n{prompts.SYSTEM}<|im_end|>\n"
  return (f"{system}<|im_start|>user\n{{image}}{{text}}\n{rule}<|im_end|>\n"
          "<|im_start|>assistant\n")


def readout_code(readout: str) -> str:
  """Lines of the README's `read_embedding` (2-space indented) that set `pos` from `ids`, `emb`."""
  if readout == "emb":
    return "  pos = emb\n"
  if readout == "end_of_reasoning":
    return ("  eor = (ids[0, :emb] == EOR).nonzero()\n"
            "  pos = int(eor[-1, 0]) if len(eor) else emb - 1\n")
  return "  pos = emb - 1  # pre_token: the token just before <|emb|>.\n"


def readme(info: dict, family: str) -> str:
  """The README.md of an export described by `info` (the `trace_embedding.json` dict)."""
  compact, readout = info["compact_prompts"], info["readout"]
  cand_reasoning = info["cand_reasoning"]
  query, cand = prompt_text(False, compact), prompt_text(True, compact, cand_reasoning)
  cls = ("Qwen2_5_VLForConditionalGeneration" if family == "qwen2_5_vl"
         else "Qwen2VLForConditionalGeneration")
  step4 = textwrap.fill(f"4. Readout `{readout}`: the state at {READOUTS[readout]}. The model "
                        "is causal, so that state does not depend on `<|emb|>` or anything after "
                        "it.", 96, subsequent_indent="   ")
  return f"""# TRACE retrieval embedding model

Exported by trace_jax (`trace_jax/infer/export.py`). The LoRA adapters are merged into the
weights, so this is a plain `{cls}` checkpoint:
`transformers.AutoModelForImageTextToText` loads it with no extra code. `{EMBEDDING_FILE}` holds
the readout below as data.

{textwrap.fill(_tokenizer_note(info), 96)}

## Reading an embedding

1. Build the prompt (below) and tokenize it with no extra special tokens.
2. {_step2(cand_reasoning)}
3. Run the model on the whole sequence with `output_hidden_states=True` and take
   `hidden_states[-1]`, the last decoder layer's output **after the final RMSNorm** (in
   transformers 5.x `hidden_states[-1]` is `last_hidden_state`, unless a config sets
   `tie_last_hidden_states=false`; checked against trace_jax with transformers 5.24).
{step4}
5. L2-normalise it. Scores are dot products of normalised query and candidate embeddings.

Query prompt (`{{text}}` is the task instruction followed by the query text):

```text
{query}```

Candidate prompt (`{{text}}` is the candidate text; without text use the rule line only):

```text
{cand}```

`{{image}}` is empty for text, or `<|vision_start|><|image_pad|><|vision_end|>` for an image:
the processor (`AutoProcessor`, when this directory has `preprocessor_config.json`) expands
`<|image_pad|>` to one token per merged patch; pass its `pixel_values`, `image_grid_thw` and
`mm_token_type_ids` to the model too, and resize images as in training (`data.image_grid`).
Without text, drop the `{{text}}\\n` before the rule line.

{_readme_code(info, query, cand)}```
"""


def _readme_code(info: dict, query: str, cand: str) -> str:
  """The README's Python snippet: embed candidates and queries with transformers."""
  readout = info["readout"]
  eor = (f"EOR = {info['eor_token_id']}  # End-of-reasoning token id.\n"
         if readout == "end_of_reasoning" else "")
  return f"""```python
import torch
import transformers

OUT = "path/to/this/directory"
model = transformers.AutoModelForImageTextToText.from_pretrained(OUT).eval()
tok = transformers.AutoTokenizer.from_pretrained(OUT)
EMB = tok.convert_tokens_to_ids("{EMB_TOKEN}")
{eor}QUERY = {query!r}
CANDIDATE = {cand!r}


def read_embedding(ids):
  \"\"\"ids [1, T] holding <|emb|> -> the L2-normalised embedding [D] (float32).\"\"\"
  with torch.no_grad():
    h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
  emb = int((ids[0] == EMB).nonzero()[0, 0])
{readout_code(readout)}  return torch.nn.functional.normalize(h[0, pos].float(), dim=-1)


def encode(text):
  return tok(text, return_tensors="pt", add_special_tokens=False).input_ids


def with_emb(ids):
  return ids if (ids[0] == EMB).any() else torch.cat([ids, torch.tensor([[EMB]])], dim=1)


def embed(ids, reason, max_new_tokens):
  if reason:  # The model describes the target first, or writes <|emb|> at once.
    ids = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=EMB, pad_token_id=EMB)
  return read_embedding(with_emb(ids))


def embed_candidate(text, max_new_tokens=256):
  return embed(encode(CANDIDATE.format(image="", text=text)), {info["cand_reasoning"]},
               max_new_tokens)


def embed_query(text, reason=True, max_new_tokens=256):
  return embed(encode(QUERY.format(image="", text=text)), reason, max_new_tokens)
"""


def _step2(cand_reasoning: bool) -> str:
  if cand_reasoning:
    return ("Queries and candidates (this model was trained to let candidates describe\n"
            "   themselves first): generate greedily until the model writes `<|emb|>` (its end\n"
            "   token); if it never does, append `<|emb|>`.")
  return ("Candidates and direct queries: append `<|emb|>`. Queries that may reason: generate\n"
          "   greedily until the model writes `<|emb|>` (its end token); if it never does, append\n"
          "   `<|emb|>`.")


def _tokenizer_note(info: dict) -> str:
  if info["tokenizer"] == "hf":
    return (f"The tokenizer (tokenizer.json) has `{EMB_TOKEN}` as special token id "
            f"{info['emb_token_id']}; `transformers.AutoTokenizer` loads it.")
  if info["tokenizer"] == "sentencepiece":
    return (f"The tokenizer is a SentencePiece model, `{SENTENCEPIECE_FILE}`, with `{EMB_TOKEN}` "
            f"as id {info['emb_token_id']}. It is **not** a transformers tokenizer: "
            "`AutoTokenizer` cannot load it; encode with `sentencepiece.SentencePieceProcessor("
            f"model_file=\"{SENTENCEPIECE_FILE}\")` (no BOS/EOS), one call per text between "
            "special tokens, and replace `tok` in the code below accordingly.")
  return (f"No tokenizer was exported: use the base model's tokenizer with `{EMB_TOKEN}` added "
          "as a special token at the id the model was trained with.")
