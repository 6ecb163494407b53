"""What the teacher works on: M-BEIR training queries joined with their positive candidate.

The queries come from (query file, pool file) pairs under an M-BEIR root (the per-dataset
training files with the union training pool, or the demo world's); a qid repeated in a file (the
up-sampled union) is taken once. Only the positives the queries name are looked up in the pool,
in one streamed pass, and their texts are not held: an item keeps where its positive's line is
(`PoolText`) and reads the text when a prompt needs it. A Wikipedia passage (OVEN, InfoSeek,
WebQA) is kilobytes, and a teacher process holds every query of M-BEIR's 1.1M.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
from typing import Sequence

from trace_jax.data import instructions as instruction_lib
from trace_jax.data import mbeir

DATASET_NAMES = {i: name for name, i in mbeir.DATASET_IDS.items()}


@dataclasses.dataclass(frozen=True, slots=True)
class PoolText:
  """A candidate's text left in its pool file: the line at byte `offset` (line `line`)."""

  path: str
  offset: int
  line: int

  def read(self) -> str:
    record = mbeir.read_line_at(self.path, self.offset, self.line)
    return mbeir.parse_candidate(record, f"{self.path}:{self.line}").text or ""


@dataclasses.dataclass(frozen=True, slots=True)
class TeachItem:
  """A query and what the teacher may see of it."""

  qid: str
  task_id: int
  dataset: str  # `mbeir.DATASET_IDS` name, e.g. "CIRR".
  where: str  # "<query file>:<line>": errors and skips name it.
  instruction: str  # The task's first instruction prompt (formatted).
  query_text: str  # The raw query text ("" for image-only queries).
  query_image: str | None  # Relative to the M-BEIR root.
  target: str | PoolText  # The positive's text ("" for an image-only positive), or its line.
  target_image: str | None

  @property
  def task_key(self) -> str:
    """`DATASET:task`, as `assess.reason` names routes."""
    return f"{self.dataset}:{self.task_id}"

  @property
  def target_text(self) -> str:
    """The positive's text (read from its pool file each time when the item holds its line)."""
    return self.target if isinstance(self.target, str) else self.target.read()

  def resolved(self) -> TeachItem:
    """This item holding its positive's text: read once, for a prompt that uses it often."""
    return self if isinstance(self.target, str) else dataclasses.replace(self,
                                                                         target=self.target_text)


def wanted(dataset: str, datasets: Sequence[str]) -> bool:
  """Whether `--datasets` (lowercase names; empty: all) selects a dataset."""
  return not datasets or dataset.lower() in {d.lower() for d in datasets}


def load_items(root: str, files: Sequence[Sequence[str]],
               datasets: Sequence[str] = ()) -> list[TeachItem]:
  """The queries of every (query file, pool file) pair, in file order, from the selected
  datasets, each with its first positive that the pool holds (one whose dataset prefix matches
  the qid's when there is one, as UniIR picks).

  Raises:
    MBEIRFormatError: a malformed line (names file and line).
    KeyError: a query none of whose positives is in its pool (names file, line and qid).
  """
  table = instruction_lib.load_instructions(mbeir.instructions_file(root))
  out, seen, shared = [], set(), {}
  for query_file, pool_file in files:
    path = os.path.join(root, query_file)
    queries = []
    for n, record in mbeir.read_jsonl(path):
      query = mbeir.parse_query(record, f"{path}:{n}")
      if query.qid in seen or not wanted(DATASET_NAMES[query.dataset_id], datasets):
        continue
      seen.add(query.qid)
      queries.append((n, query))
    needed = {did for _, q in queries for did in q.pos_cand_list}
    pool = _positives(os.path.join(root, pool_file), needed)
    for n, q in queries:
      out.append(_item(q, f"{query_file}:{n}", pool, table, shared))
  return out


@dataclasses.dataclass(frozen=True, slots=True)
class _Positive:
  did: str
  dataset_id: int
  text: str | PoolText
  image_path: str | None


def _positives(path: str, needed: set[str]) -> dict[str, _Positive]:
  """The candidates of a pool file whose dids are in `needed` (one pass), each text left in the
  file (`PoolText`)."""
  out = {}
  for n, offset, record in mbeir.read_jsonl_at(path):
    if record.get("did") in needed:
      cand = mbeir.parse_candidate(record, f"{path}:{n}")
      text = PoolText(path, offset, n) if cand.text else ""
      out[cand.did] = _Positive(cand.did, cand.dataset_id, text, cand.image_path)
  return out


def _item(q: mbeir.Query, where: str, pool: dict[str, _Positive],
          table: instruction_lib.InstructionTable, shared: dict[str, str]) -> TeachItem:
  """The query's item; `shared` holds one copy of each instruction text (a task has a few); the
  qid is interned, as the phases' records' are (`shards.read`)."""
  held = [pool[d] for d in q.pos_cand_list if d in pool]
  if not held:
    raise KeyError(f"{where}: no positive of qid {q.qid} {list(q.pos_cand_list)} is in its pool")
  same = [c for c in held if c.dataset_id == q.dataset_id]
  pos = (same or held)[0]
  instruction = instruction_lib.instruction_for(q, instruction_lib.target_modality(q.task_id),
                                                table, mode="first")
  return TeachItem(sys.intern(q.qid), q.task_id, DATASET_NAMES[q.dataset_id], where,
                   shared.setdefault(instruction, instruction), q.text or "", q.image_path,
                   pos.text, pos.image_path)


def sample_items(items: Sequence[TeachItem], n: int, seed: int) -> list[TeachItem]:
  """`n` items drawn without replacement by `seed` across every dataset (the same draw in every
  process), kept in file order; all of them when `n` is 0 or not smaller than their count.

  The first `n` in file order would be one dataset's (VisualNews leads M-BEIR's list), so a
  small sample of a reasoning run would hold no reasoning query."""
  if not n or n >= len(items):
    return list(items)
  chosen = sorted(random.Random(seed).sample(range(len(items)), n))
  return [items[i] for i in chosen]
