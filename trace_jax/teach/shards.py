"""Resumable JSON-lines output: each process appends to its own shard of each phase's records.

A phase's records live in `OUT/<phase>.p<i>of<n>.jsonl`, one JSON object per line with a `qid`.
A process killed mid-write leaves at most a partial last line, which the next run cuts off; the
qids already written (by any process of any earlier run, whatever its process count) are done and
never redone, so a rerun finishes the rest without duplicating a record. A record is known by its
`qid`, or by (`qid`, `attempt`) in the phases that keep one record per attempt (`attempt_key`).
Lines are flushed as they are written.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import Callable, Hashable, Iterable, Iterator

import jax


def shard_paths(out_dir: str, phase: str) -> list[str]:
  return sorted(glob.glob(os.path.join(out_dir, f"{phase}.p*of*.jsonl")))


def read(out_dir: str, phase: str) -> Iterator[dict]:
  """Every complete record of a phase, shard by shard (a partial last line is skipped), its qid
  interned: the phases key every query's records by qid, one string per query among them all
  (`items.load_items` interns the items' qids too)."""
  for path in shard_paths(out_dir, phase):
    with open(path, encoding="utf-8") as f:
      for line in f:
        if line.endswith("\n"):
          record = json.loads(line)
          if isinstance(record.get("qid"), str):
            record["qid"] = sys.intern(record["qid"])
          yield record


def attempt_key(record: dict) -> tuple[str, int]:
  """(qid, attempt) of a generated or verified record (a record from before attempts: 0)."""
  return record["qid"], record.get("attempt", 0)


class Shard:
  """This process's shard of a phase: the keys done so far (every shard's), and `write`."""

  def __init__(self, out_dir: str, phase: str,
               key: Callable[[dict], Hashable] = lambda r: r["qid"]):
    os.makedirs(out_dir, exist_ok=True)
    self.path = os.path.join(out_dir, f"{phase}.p{jax.process_index()}of"
                                      f"{jax.process_count()}.jsonl")
    _cut_partial_line(self.path)
    self.key = key
    self.done = {key(r) for r in read(out_dir, phase)}
    self._file = open(self.path, "a", encoding="utf-8")

  def write(self, records: Iterable[dict]) -> None:
    for r in records:
      self._file.write(json.dumps(r, ensure_ascii=False) + "\n")
      self.done.add(self.key(r))
    self._file.flush()

  def close(self) -> None:
    self._file.close()


_TAIL = 1 << 16  # Bytes read at a time looking for the last newline.


def _cut_partial_line(path: str) -> None:
  """Truncates a file after its last newline (what a kill mid-write leaves behind)."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:  # Read backwards from the end: a shard can be gigabytes.
    end = f.seek(0, os.SEEK_END)
    pos = end
    while pos > 0:
      start = max(0, pos - _TAIL)
      f.seek(start)
      block = f.read(pos - start)
      if pos == end and block.endswith(b"\n"):
        return
      newline = block.rfind(b"\n")
      if newline >= 0:
        f.truncate(start + newline + 1)
        return
      pos = start
    f.truncate(0)
