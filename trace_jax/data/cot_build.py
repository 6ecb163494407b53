"""Builds a filtered M-BEIR-CoT file from raw teacher outputs (the logic of `tools/build_cot`).

Joins each raw record by qid with its query and the text of its positive candidates, runs
`cot.filter_record` on reason records (direct records pass through), writes the kept records and
every dropped one with its reason, and reports how many each rule dropped. It runs no teacher and
no verifier model.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Iterable, Sequence

from trace_jax.data import cot, mbeir
from trace_jax.data import instructions as instruction_lib
from trace_jax.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer


@dataclasses.dataclass(frozen=True)
class Report:
  """What one build did."""
  read: int  # Records in the raw file.
  dropped: dict[str, int]  # Reason code -> records dropped by it (every rule present).
  kept: dict[str, int]  # Route -> records kept (both routes present).
  out_path: str
  dropped_path: str


@dataclasses.dataclass(frozen=True)
class Context:
  """The texts the keyword rule compares a record's answer with."""
  query_text: str
  target_text: str


def dropped_path_for(out_path: str) -> str:
  """`x.jsonl` -> `x.dropped.jsonl`; any other name gets `.dropped.jsonl` appended."""
  stem = out_path[:-len(".jsonl")] if out_path.endswith(".jsonl") else out_path
  return f"{stem}.dropped.jsonl"


def load_tokenizer(path: str) -> Tokenizer:
  """A `tokenizer.json` (Hugging Face) or a SentencePiece `.model` file."""
  if path.endswith(".json"):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    import tokenizers  # Only this branch needs it.
    return HFTokenizer(tokenizers.Tokenizer.from_file(path))
  if path.endswith(".model"):
    return SentencePieceTokenizer.from_file(path)
  raise ValueError(f"--tokenizer must end in .json or .model, got {path!r}")


def _first_queries(paths: Sequence[str]) -> dict[str, mbeir.Query]:
  """`{qid: Query}` keeping the first line of a qid (union_train repeats qids)."""
  out: dict[str, mbeir.Query] = {}
  for path in paths:
    for query in mbeir.load_queries(path):
      out.setdefault(query.qid, query)
  return out


def _pools(paths: Sequence[str]) -> dict[str, mbeir.Candidate]:
  out: dict[str, mbeir.Candidate] = {}
  for path in paths:
    out.update(mbeir.load_pool(path))
  return out


def _paths(p: str | Sequence[str]) -> list[str]:
  return [p] if isinstance(p, str) else list(p)


def _query_side(query: mbeir.Query, table: instruction_lib.InstructionTable | None) -> str:
  """The query text, preceded by every prompt of its instruction row when a table is given."""
  if table is None:
    return query.text or ""
  cand_modality = instruction_lib.target_modality(query.task_id)
  key = instruction_lib.instruction_key(query.dataset_id, query.modality, cand_modality)
  if key not in table:
    raise KeyError(f"no instruction for key {key!r} (qid {query.qid})")
  return " ".join([*table[key], query.text or ""])


def _context(record: cot.CoTRecord, where: str, queries: dict[str, mbeir.Query],
             queries_path: list[str], pool: dict[str, mbeir.Candidate], pool_path: list[str],
             table: instruction_lib.InstructionTable | None) -> Context:
  """Joins a raw record with its query and positives; `where` (`raw:line`) prefixes errors."""
  query = queries.get(record.qid)
  if query is None:
    raise mbeir.MBEIRFormatError(f"{where}: qid {record.qid} is not in "
                                 f"{', '.join(queries_path)}")
  if query.task_id != record.task_id:
    raise mbeir.MBEIRFormatError(f"{where}: qid {record.qid} has task_id {record.task_id}, but "
                                 f"{', '.join(queries_path)} says {query.task_id}")
  positives = [pool[did] for did in query.pos_cand_list if did in pool]
  if not positives:
    raise mbeir.MBEIRFormatError(f"{where}: no positive of qid {record.qid} "
                                 f"{list(query.pos_cand_list)} is in {', '.join(pool_path)}")
  target = " ".join(c.text for c in positives if c.text)
  return Context(query_text=_query_side(query, table), target_text=target)


def _write_jsonl(path: str, rows: Iterable[dict[str, object]]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build(raw_path: str, queries_path: str | Sequence[str], pool_path: str | Sequence[str],
          out_path: str, tokenizer: Tokenizer | None = None,
          instructions_path: str | None = None,
          cfg: cot.FilterConfig = cot.FilterConfig()) -> Report:
  """Filters a raw M-BEIR-CoT file and writes the kept and the dropped records. The queries and
  the pool may each be one file or several (the per-task files of a split).

  Every record is joined before anything is written, so a join error leaves no output behind.

  Raises:
    MBEIRFormatError: a malformed input line, a raw qid missing from the queries file, a task id
      that disagrees with it, or a query with no positive in the pool (names file and line).
  """
  raw = cot.read_cot_numbered(raw_path)
  queries_path, pool_path = _paths(queries_path), _paths(pool_path)
  queries = _first_queries(queries_path)
  pool = _pools(pool_path)
  table = instruction_lib.load_instructions(instructions_path) if instructions_path else None
  contexts = {qid: _context(rec, f"{raw_path}:{n}", queries, queries_path, pool, pool_path, table)
              for qid, (n, rec) in raw.items()}
  kept, dropped = [], []
  for qid, (_, record) in raw.items():
    ctx = contexts[qid]
    reason = cot.filter_record(record, ctx.query_text, ctx.target_text, tokenizer, cfg)
    if reason is None:
      kept.append(record)
    else:
      dropped.append({"qid": qid, "task_id": record.task_id, "route": record.route,
                      "reason": reason})
  dropped_path = dropped_path_for(out_path)
  _write_jsonl(out_path, (r.to_json() for r in kept))
  _write_jsonl(dropped_path, dropped)
  by_rule = collections.Counter(d["reason"] for d in dropped)
  by_route = collections.Counter(r.route for r in kept)
  return Report(read=len(raw), dropped={rule: by_rule[rule] for rule in cot.RULES},
                kept={route: by_route[route] for route in cot.ROUTES}, out_path=out_path,
                dropped_path=dropped_path)


def format_report(report: Report) -> str:
  """The printed table: drops per rule in rule order, then kept records per route."""
  lines = [f"read {report.read} records", f"{'rule':<14}{'dropped':>8}"]
  lines += [f"{rule:<14}{n:>8}" for rule, n in report.dropped.items()]
  lines += [f"{'total':<14}{sum(report.dropped.values()):>8}", f"{'route':<14}{'kept':>8}"]
  lines += [f"{route:<14}{n:>8}" for route, n in report.kept.items()]
  lines += [f"{'total':<14}{sum(report.kept.values()):>8}",
            f"wrote {report.out_path} and {report.dropped_path}"]
  return "\n".join(lines)
