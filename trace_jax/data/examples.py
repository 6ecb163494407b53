"""Training examples: one query, its TRACE target and one positive candidate, as plain records.

`build_examples` joins M-BEIR queries, their candidate pool, the instruction table and an
M-BEIR-CoT file into `TrainExample`s; they serialise to JSON (images by path) for the Grain source,
or with image bytes inline for ArrayRecord shards. Turning an example into token ids and pixels is
`transforms.py`'s job.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import random
from typing import Any, Iterable

from trace_jax.data import cot as cot_lib
from trace_jax.data import instructions as instruction_lib
from trace_jax.data import mbeir
from trace_jax.data import negatives

CAND_TARGETS = ("none", "answer", "full")  # Candidate-side reasoning (`data.cand_target`).
COT_MISSING = ("error", "drop")
# `data.target` of a backbone's LM-only pretraining: every example is a chat turn to learn.
LM_TARGET = "lm"  # A query without an M-BEIR-CoT record (`data.cot_missing`).
_log = logging.getLogger(__name__)


# Slots: a million examples are held at once (M-BEIR's union training), without a __dict__ each.
@dataclasses.dataclass(frozen=True, slots=True)
class TrainExample:
  example_id: str  # "<query file>:<line>", unique and stable: errors and skips name it.
  qid: str
  task_id: int
  query_text: str  # UniIR-formatted instruction followed by the query text.
  query_image: str | None  # Path relative to the M-BEIR root.
  reasoning: str | None  # The teacher's text with its tags stripped; None for direct examples.
  cand_id: str
  cand_text: str | None
  cand_image: str | None
  # What the candidate writes before `<|emb|>` (candidate-side reasoning, `data.cand_target`);
  # None: it embeds at once (the paper's setting).
  cand_reasoning: str | None = None
  # The hard negative (`data.hard_negatives`, `negatives.py`); None: in-batch negatives only.
  neg_id: str | None = None
  neg_text: str | None = None
  neg_image: str | None = None

  @property
  def is_reasoning(self) -> bool:
    return self.reasoning is not None

  def to_dict(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TrainExample":
    return cls(**d)


def build_examples(root: str, query_file: str, pool: dict[str, mbeir.Candidate],
                   instructions: instruction_lib.InstructionTable,
                   cot: dict[str, cot_lib.CoTRecord] | None = None, *,
                   instruction_mode: str = "first", seed: int = 0, target: str = "full",
                   cand_target: str = "none", marker: str = "",
                   cot_missing: str = "error", hard_negatives: str = "none",
                   coverage: cot_lib.CoTCoverage | None = None) -> list[TrainExample]:
  """Examples of one query file; the positive is the first of `pos_cand_list`.

  Every query must have its positive in `pool`. When `cot` is given, a query without a CoT
  record is an error naming the file and query id, or with `cot_missing="drop"` (an M-BEIR-CoT
  file that `build_cot` filtered: the queries it dropped are not trained on) it is left out,
  counted and logged. `target` picks what
  a reasoning example learns: "full", "answer", "reasoning" (`cot.training_target`), or "direct"
  (no reasoning text at all: the direct-only ablation); "lm" (a backbone's LM-only pretraining)
  gives every example a response to learn: its teacher's text (tags stripped), or for a direct
  query the positive candidate's text (an image->caption query learns the caption).
  `cand_target` ("none", "answer", "full"): candidate-side reasoning, the paper's ablation. The
  positive candidate of a reasoning query learns to write that part of the query's teacher
  output (whose answer describes this very candidate) before its `<|emb|>`; candidates of direct
  queries write nothing. `marker`: the
  end-of-reasoning token written after the reasoning (`data.reasoning_marker`), or "".
  `hard_negatives`: "none", "listed" or "pool", each example's hard negative (`negatives.py`).
  `coverage`: with `cot`, a query of a dataset the CoT file does not cover is left out and
  counted there (`load_split` then drops or refuses it).
  """
  if cand_target not in CAND_TARGETS:
    raise ValueError(f"data.cand_target={cand_target!r}; expected one of {CAND_TARGETS}")
  if cand_target != "none" and cot is None:
    raise ValueError(f"data.cand_target={cand_target!r} needs an M-BEIR-CoT file (data.cot_file)")
  if cot_missing not in COT_MISSING:
    raise ValueError(f"data.cot_missing={cot_missing!r}; expected one of {COT_MISSING}")
  rng = random.Random(seed)
  out, dropped = [], 0
  name = os.path.basename(query_file)
  pick_negative = negatives.NegativePicker(hard_negatives, pool, seed, name)
  for line, record in mbeir.read_jsonl(query_file):
    where = f"{query_file}:{line}"
    query = mbeir.parse_query(record, where)
    did = query.pos_cand_list[0]
    if did not in pool:
      raise KeyError(f"{where}: positive candidate {did} of query {query.qid} is not in the pool")
    cand = pool[did]
    text = instruction_lib.query_text_with_instruction(query, cand.modality, instructions,
                                                       mode=instruction_mode, rng=rng)
    reasoning = cand_reasoning = None
    if cot is not None:
      if coverage is not None and not coverage.admits(query.dataset_id):
        continue
      if query.qid not in cot:
        if cot_missing == "drop":
          dropped += 1
          continue
        raise KeyError(f"{where}: query {query.qid} has no record in the M-BEIR-CoT file (set "
                       "data.cot_missing=drop to train on the queries the file lists)")
      if target != "direct":
        part = "full" if target == LM_TARGET else target
        reasoning = cot_lib.training_target(cot[query.qid], part, marker)
      if cand_target != "none":
        cand_reasoning = cot_lib.training_target(cot[query.qid], cand_target, marker)
    if target == LM_TARGET and reasoning is None:
      reasoning = cand.text
      if not (reasoning or "").strip():
        raise ValueError(f"{where}: query {query.qid} has nothing to learn under "
                         "data.target='lm': no teacher output and no candidate text")
    neg = pick_negative(query, where)
    out.append(TrainExample(f"{name}:{line}", query.qid, query.task_id, text, query.image_path,
                            reasoning, did, cand.text, cand.image_path, cand_reasoning,
                            *((neg.did, neg.text, neg.image_path) if neg else ())))
  if dropped:
    _log.info("%s: %d of %d queries have no M-BEIR-CoT record and are not trained on "
              "(data.cot_missing=drop)", query_file, dropped, dropped + len(out))
  if pick_negative.from_pool:
    _log.info("%s: %d of %d queries list no negative candidate; their hard negatives are drawn "
              "from the pool (data.hard_negatives=listed)", query_file,
              pick_negative.from_pool, len(out))
  return out


def load_split(root: str, files: Iterable[tuple[str, str]], cot_file: str | None, *,
               instruction_mode: str = "first", seed: int = 0, target: str = "full",
               cand_target: str = "none", marker: str = "",
               cot_missing: str = "error", hard_negatives: str = "none",
               cot_drop_datasets: tuple[str, ...] = ()) -> list[TrainExample]:
  """Examples of every (query file, pool file) pair under `root`, in order, with routes and
  reasoning from `cot_file` (None: every example is direct); the keywords as `build_examples`.

  Raises:
    ValueError: the CoT file covers no query of some dataset of the files (names each, with its
      query count) that `cot_drop_datasets` does not name (`cot.CoTCoverage`).
  """
  instructions = instruction_lib.load_instructions(mbeir.instructions_file(root))
  cot = cot_lib.read_cot(cot_file) if cot_file else None
  coverage = cot_lib.CoTCoverage(cot, tuple(cot_drop_datasets)) if cot is not None else None
  files = list(files)
  pools = _Pools(root, files, hard_negatives)
  out: list[TrainExample] = []
  for query_file, pool_file in files:
    pool = pools.take(pool_file)
    out += build_examples(root, os.path.join(root, query_file), pool, instructions, cot,
                          instruction_mode=instruction_mode, seed=seed, target=target,
                          cand_target=cand_target, marker=marker, cot_missing=cot_missing,
                          hard_negatives=hard_negatives, coverage=coverage)
  if coverage is not None:
    coverage.check(cot_file)
  return out


class _Pools:
  """Each pool file of a split parsed once, however many query files pair with it (M-BEIR's ten
  training files all pair with the 1.1M-candidate union pool), and dropped after its last user.

  With `hard_negatives="none"` only the candidates the query files name as positives are parsed
  and kept (one pass over the query files first); a hard negative may be any candidate of the
  pool (`negatives.py`), so the other modes keep the whole pool.
  """

  def __init__(self, root: str, files: list[tuple[str, str]], hard_negatives: str):
    self.root, self.whole = root, hard_negatives != "none"
    self.users = collections.Counter(pool_file for _, pool_file in files)
    self.queries: dict[str, list[str]] = collections.defaultdict(list)
    for query_file, pool_file in files:
      self.queries[pool_file].append(query_file)
    self.held: dict[str, dict[str, mbeir.Candidate]] = {}

  def take(self, pool_file: str) -> dict[str, mbeir.Candidate]:
    """The pool of `pool_file` for its next query file (in `files` order)."""
    if pool_file not in self.held:
      path = os.path.join(self.root, pool_file)
      if self.whole:
        self.held[pool_file] = mbeir.load_pool(path)
      else:
        needed = _positive_dids(os.path.join(self.root, q) for q in self.queries[pool_file])
        self.held[pool_file] = mbeir.load_pool_subset(path, needed)
    self.users[pool_file] -= 1
    if self.users[pool_file]:
      return self.held[pool_file]
    return self.held.pop(pool_file)


def _positive_dids(query_files: Iterable[str]) -> set[str]:
  """The dids that `build_examples` takes as positives (the first of each `pos_cand_list`); a
  malformed line is left for `build_examples` to report."""
  out = set()
  for path in query_files:
    for _, record in mbeir.read_jsonl(path):
      pos = record.get("pos_cand_list")
      if isinstance(pos, list) and pos and isinstance(pos[0], str):
        out.add(pos[0])
  return out
