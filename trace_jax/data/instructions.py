"""M-BEIR task instructions: the instruction table, UniIR's `format_string` and instruction rule.

Reads `instructions/query_instructions.tsv` and turns a query into the text a model sees: the
instruction chosen for its (dataset, query modality, target modality) followed by the query text,
formatted as UniIR formats it (`src/data/mbeir_dataset.py`). The files themselves are found by
`mbeir.py`; prompts around this text are `prompts.py`'s.
"""

from __future__ import annotations

import random
from typing import Literal

from trace_jax.data.mbeir import TASK_MODALITIES, MBEIRFormatError, Query

# "dataset_id, query_modality, cand_modality" (UniIR's key string) -> the non-empty raw prompts.
InstructionTable = dict[str, tuple[str, ...]]


def format_string(s: str | None) -> str:
  """UniIR `format_string`: strip, drop CRs and quotes, capitalise, end with `.`, `?` or `!`."""
  s = (s or "").replace("\r", "").strip().strip('"')
  if s:
    s = s[0].upper() + s[1:]
    s = s + "." if s[-1] not in [".", "?", "!"] else s
  return s


def instruction_key(dataset_id: int | str, query_modality: str, cand_modality: str) -> str:
  """UniIR's instruction key string, e.g. `"9, text, image"` or `"8, image,text, image"`."""
  return f"{dataset_id}, {query_modality}, {cand_modality}"


def load_instructions(path: str) -> InstructionTable:
  """Reads `query_instructions.tsv` as UniIR's `_load_query_instructions` does.

  Columns: `query_modality, cand_modality, dataset, dataset_id, prompt_1, ...`, one header line.
  Empty prompt cells (the CIRR row has three prompts) are dropped; prompts are kept raw.

  Returns:
    `{instruction_key(dataset_id, query_modality, cand_modality): prompts}`.

  Raises:
    MBEIRFormatError: a row with under 5 columns, a non-integer dataset id, no prompt, or a key
      seen before (names file and line).
  """
  table: InstructionTable = {}
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      if n == 1 or not line.strip():
        continue
      where = f"{path}:{n}"
      parts = line.rstrip("\r\n").split("\t")
      if len(parts) < 5:
        raise MBEIRFormatError(f"{where}: expected >= 5 tab-separated columns, got {len(parts)}")
      query_modality, cand_modality, _, dataset_id = (p.strip() for p in parts[:4])
      if not dataset_id.isdigit():
        raise MBEIRFormatError(f"{where}: dataset_id must be an integer, got {dataset_id!r}")
      key = instruction_key(dataset_id, query_modality, cand_modality)
      prompts = tuple(p.strip() for p in parts[4:] if p.strip())
      if not prompts:
        raise MBEIRFormatError(f"{where}: no prompt for {key!r}")
      if key in table:
        raise MBEIRFormatError(f"{where}: duplicate instruction key {key!r}")
      table[key] = prompts
  return table


def target_modality(task_id: int) -> str:
  """The candidate modality of a UniIR task id (its `MBEIR_TASK` map)."""
  return TASK_MODALITIES[task_id][1]


def instruction_for(query: Query, cand_modality: str, table: InstructionTable, *,
                    mode: Literal["first", "random"] = "first",
                    rng: random.Random | None = None) -> str:
  """Chooses a query's instruction and passes it through `format_string`, as UniIR does.

  Args:
    query: the query; its dataset id and modality select the row.
    cand_modality: the modality of the query's positive (UniIR picks a positive with the qid's
      prefix); `target_modality(query.task_id)` gives the same answer.
    table: from `load_instructions`.
    mode: `"first"` takes `prompt_1` (deterministic, Pyserini's default); `"random"` draws
      uniformly from the row's non-empty prompts with `rng.choice` (UniIR train and eval).
    rng: required for `"random"`; seed it for reproducible draws.

  Returns:
    The formatted prompt.

  Raises:
    KeyError: no row for the key (names the key and the qid).
    ValueError: an unknown mode, or `"random"` without `rng`.
  """
  key = instruction_key(query.dataset_id, query.modality, cand_modality)
  prompts = table.get(key)
  if not prompts:
    raise KeyError(f"no instruction for key {key!r} (qid {query.qid})")
  if mode == "first":
    return format_string(prompts[0])
  if mode == "random":
    if rng is None:
      raise ValueError("mode='random' needs an rng (e.g. random.Random(seed))")
    return format_string(rng.choice(prompts))
  raise ValueError(f"unknown instruction mode {mode!r}; expected 'first' or 'random'")


def query_text_with_instruction(query: Query, cand_modality: str, table: InstructionTable, *,
                                mode: Literal["first", "random"] = "first",
                                rng: random.Random | None = None) -> str:
  """UniIR's query text: `format_string(f"{prompt} {query_txt or ''}")`.

  An image-only query gets the formatted instruction alone. Arguments are as `instruction_for`.
  """
  prompt = instruction_for(query, cand_modality, table, mode=mode, rng=rng)
  return format_string(f"{prompt} {query.text or ''}")
