"""M-BEIR retrieval metrics with UniIR's definitions: Recall@k, run files, summaries, tables.

What this is: pure-Python scoring of rankings that already exist. `recall_at_k` is UniIR's
`compute_recall_at_k` (TIGER-AI-Lab/UniIR @98dc570, `src/common/mbeir_retriever.py`), which LamRA
reuses: a query is a hit at k if ANY of its positives is among its first k candidates, and the
task value is the mean of hits over the task's queries. It is hit@k (success@k), not the
fraction of positives retrieved, so a query with two positives counts once. `read_run_file`
parses UniIR's run files; `task_result`, `summary` and `markdown_table` shape the numbers into
the report layout (headline R@5, or R@10 for fashion200k_task0/task3 and fashioniq_task7, and the
plain mean over tasks). Spec: `shared/MBEIR_FORMAT.md` sections 7 and 10.

Candidate filtering: none, on purpose. M-BEIR as scored by UniIR and LamRA defines no filtering of
candidates, in local pools or in the union pool (MBEIR_FORMAT.md 7.3-7.5): no filtering by the
task's target modality (a local pool holds one modality anyway; in the union pool a same-caption
text candidate above the positive image is a miss), no removal of the query's own item (a CIRR
reference image at rank 1 stays there), and no merging of duplicate content. Positives are not
filtered either: an OVEN positive with the INFOSEEK prefix is kept; it cannot be hit in the OVEN
local pool and counts as a hit in the union pool (7.6). A ranking is scored exactly as given.

What this is not: no search, no embedding and no file discovery (the readers live in
`trace_jax/data/mbeir.py`), and no rounding: UniIR rounds each task value to 4 decimals before
averaging; values here are exact, so an average may differ from UniIR's by under 5e-5.
"""

from __future__ import annotations

import math
import re
from typing import AbstractSet, Any, Mapping, Sequence

from trace_jax.data import mbeir

# A ranking: candidate dids, best first. Keyed by qid in the query namespace.
Rankings = Mapping[str, Sequence[str]]
# Positives: qid -> set of relevant dids (what `mbeir.load_qrels` returns).
Qrels = Mapping[str, AbstractSet[str]]

_RUN_COLUMNS = "qid Q0 did rank score run_id task_id"
_TASK_SUFFIX_RE = re.compile(r"_task(\d+)$")
# Modality letters of the paper tables: qt = query text, ci = candidate image, and so on.
_MODALITY_LETTERS = {"text": ("t",), "image": ("i",), "image,text": ("i", "t")}


class RunFileError(ValueError):
  """A run file does not follow UniIR's format; the message starts with `path:line:`."""


# ------------------------------------------------------------------------------------- recall


def recall_at_k(ranked: Rankings, positives: Qrels, k: int) -> float:
  """UniIR Recall@k: mean over queries of 1[any positive is in the first k of the ranking].

  The queries are the keys of `positives` (UniIR iterates the task's query file, whose qrels are
  its `pos_cand_list`s). A query with no ranking, or with an empty positive set, is a miss.
  Nothing is filtered (see the module docstring).

  Args:
    ranked: qid -> dids, best first; may be longer or shorter than k.
    positives: qid -> relevant dids.
    k: cutoff, >= 1.

  Returns:
    The fraction of queries with a hit in the top k, in [0, 1].

  Raises:
    ValueError: k < 1, no queries, or a qid in `ranked` that is not in `positives` (named).
    TypeError: a ranking is a bare string rather than a sequence of dids.
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  if not positives:
    raise ValueError("no queries: the positives (qrels) are empty")
  _check_known_qids(ranked, positives)
  hits = sum(_is_hit(ranked.get(qid, ()), relevant, k, qid) for qid, relevant in positives.items())
  return hits / len(positives)


def _is_hit(ranking: Sequence[str], relevant: AbstractSet[str], k: int, qid: str) -> bool:
  """Whether any relevant did is among the first k of `ranking`."""
  if isinstance(ranking, str):
    raise TypeError(f"ranking of qid {qid!r} is a string ({ranking!r}); expected a list of dids")
  return any(did in relevant for did in ranking[:k])


def _check_known_qids(ranked: Rankings, positives: Qrels) -> None:
  """Raises if `ranked` holds qids without qrels (UniIR would raise a KeyError there)."""
  unknown = sorted(qid for qid in ranked if qid not in positives)
  if unknown:
    shown = ", ".join(repr(q) for q in unknown[:5])
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    raise ValueError(f"qid {shown}{more} ranked but not in the qrels "
                     f"({len(unknown)} unknown of {len(ranked)} ranked)")


# ----------------------------------------------------------------------------------- run files


def read_run_file(path: str) -> dict[str, list[str]]:
  """Reads a UniIR run file, lines `qid Q0 did rank score run_id task_id`.

  Each qid's dids are ordered by the rank column (not by line order). Per qid the ranks must be
  exactly 1..n, so a gap cannot silently move a candidate up. Blank lines are skipped.

  Args:
    path: the run file, e.g. `mbeir_mscoco_task0_single_pool_test_k10_run.txt`.

  Returns:
    qid -> dids, best first, qids in order of first appearance.

  Raises:
    RunFileError: a line without 7 columns, a second column other than `Q0`, a non-integer or
      non-positive rank, a non-numeric score, a rank repeated for a qid (all name `path:line`),
      or a qid whose ranks are not 1..n (names the file and qid).
  """
  by_rank: dict[str, dict[int, str]] = {}
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{line_number}"
      qid, did, rank = _parse_run_line(line, where)
      ranks = by_rank.setdefault(qid, {})
      if rank in ranks:
        raise RunFileError(f"{where}: qid {qid!r} has rank {rank} twice")
      ranks[rank] = did
  return {qid: _ordered(ranks, qid, path) for qid, ranks in by_rank.items()}


def _parse_run_line(line: str, where: str) -> tuple[str, str, int]:
  """Splits and checks one run line; returns (qid, did, rank)."""
  parts = line.split()
  if len(parts) != 7:
    raise RunFileError(f"{where}: expected 7 columns '{_RUN_COLUMNS}', got {len(parts)}: "
                       f"{line.strip()!r}")
  qid, q0, did, rank, score = parts[:5]
  if q0 != "Q0":
    raise RunFileError(f"{where}: second column must be 'Q0', got {q0!r}")
  if not rank.isdigit() or int(rank) < 1:
    raise RunFileError(f"{where}: rank must be a positive integer, got {rank!r}")
  try:
    if not math.isfinite(float(score)):
      raise ValueError(score)
  except ValueError as e:
    raise RunFileError(f"{where}: score must be a finite number, got {score!r}") from e
  return qid, did, int(rank)


def _ordered(ranks: dict[int, str], qid: str, path: str) -> list[str]:
  """The dids of one qid in rank order, checking that the ranks are 1..n."""
  missing = [r for r in range(1, len(ranks) + 1) if r not in ranks]
  if missing:
    raise RunFileError(f"{path}: qid {qid!r} lacks rank {missing[0]} (its highest is "
                       f"{max(ranks)}); ranks must be 1..n")
  return [ranks[r] for r in range(1, len(ranks) + 1)]


# ----------------------------------------------------------------------------- task results


def task_result(ranked: Rankings, qrels: Qrels, k_list: Sequence[int], headline_k: int,
                reason_rate: float | None = None) -> dict[str, Any]:
  """Scores one task: the headline recall and Recall@k for every k in `k_list`.

  UniIR's k lists are (1, 5, 10), or (10, 20, 50) for the fashion tasks; `headline_k` is the
  task's `mbeir.EvalTask.headline_k` (5, or 10 for fashion).

  Args:
    ranked: qid -> dids, best first.
    qrels: qid -> relevant dids; its keys are the task's queries.
    k_list: cutoffs to report as `"recall@<k>"` keys.
    headline_k: the cutoff of the reported number, stored as `"recall"` and `"k"`.
    reason_rate: fraction of queries routed to reasoning (TRACE), or None if not measured.

  Returns:
    `{"recall": R@headline_k, "k": headline_k, "recall@<k>": .. for each k, "num_queries": n,
    "reason_rate": reason_rate}`.

  Raises:
    ValueError: as `recall_at_k`, or a reason rate outside [0, 1].
  """
  if reason_rate is not None and not 0.0 <= reason_rate <= 1.0:
    raise ValueError(f"reason_rate must be in [0, 1], got {reason_rate}")
  result: dict[str, Any] = {"recall": recall_at_k(ranked, qrels, headline_k), "k": headline_k}
  for k in k_list:
    result[f"recall@{k}"] = recall_at_k(ranked, qrels, k)
  result["num_queries"] = len(qrels)
  result["reason_rate"] = reason_rate
  return result


def summary(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """Collects task results into the report layout, with the plain mean of headline recalls.

  Args:
    results: task name (`"<dataset>_task<k>"`) -> a `task_result` dict, in report order.

  Returns:
    `{"tasks": {name: result}, "average": unweighted mean of the "recall" values,
    "num_tasks": n, "average_reason_rate": mean of the reason rates, or None if any is None}`.
    The average is M-BEIR's: each task counts once, whatever its number of queries.

  Raises:
    ValueError: no tasks.
  """
  if not results:
    raise ValueError("summary needs at least one task result")
  tasks = {name: dict(result) for name, result in results.items()}
  rates = [result.get("reason_rate") for result in tasks.values()]
  return {
      "tasks": tasks,
      "average": sum(result["recall"] for result in tasks.values()) / len(tasks),
      "num_tasks": len(tasks),
      "average_reason_rate": None if None in rates else sum(rates) / len(rates),
  }


# ------------------------------------------------------------------------------------ tables


def markdown_table(report: Mapping[str, Any]) -> str:
  """Renders a `summary` as a Markdown table shaped like the paper's Tables 1 and 2.

  One row per task (modalities, dataset, headline metric, recall x100, reason rate %, queries),
  then the average row. Recalls and rates are printed x100 with one decimal, as in the paper.
  When the report says how it was made (`evaluate`'s encoder mode, pools and instruction mode),
  a line above the table says so: instructions drawn at random move recall by themselves.

  Args:
    report: the dict returned by `summary`.

  Returns:
    The table, lines joined by newlines, with a trailing newline.
  """
  lines = []
  if "instruction_mode" in report:
    seed = report.get("instruction_seed")
    drawn = ("each query's first instruction" if report["instruction_mode"] == "first" else
             f"instructions drawn at random (seed {seed})")
    lines += [f"Step {report.get('step')}, {report.get('encoder_mode')} encoder, "
              f"{report.get('pool')} pools, {drawn}.", ""]
  lines += ["| Task | Dataset | Metric | Recall | Reason rate | Queries |",
            "|------|---------|--------|-------:|------------:|--------:|"]
  for name, result in report["tasks"].items():
    lines.append(f"| {_task_label(name)} | {_dataset_label(name)} | R@{result['k']} "
                 f"| {_percent(result['recall'])} | {_percent(result.get('reason_rate'))} "
                 f"| {result.get('num_queries', '')} |")
  lines.append(f"| **Average** | {report.get('num_tasks', len(report['tasks']))} tasks | "
               f"| **{_percent(report['average'])}** "
               f"| {_percent(report.get('average_reason_rate'))} | |")
  return "\n".join(lines) + "\n"


def console_table(report: Mapping[str, Any]) -> str:
  """A plain-text table of a `summary` for the terminal: per task R@1, R@5, reasoning rate and,
  when timed, queries/s in the adaptive and direct modes and their ratio; then the average.

  Args:
    report: the dict `mbeir_eval.evaluate` returns (task entries may carry "qps" per mode).

  Returns:
    The table, lines joined by newlines, with a trailing newline.
  """
  head = f"{'task':24s} {'R@1':>6s} {'R@5':>6s} {'reason':>7s} {'qps adapt':>10s} " \
         f"{'qps direct':>10s} {'ratio':>6s}"
  lines = [head, "-" * len(head)]
  for name, r in report["tasks"].items():
    qps = r.get("qps") or {}
    adaptive, direct = qps.get("adaptive"), qps.get("direct")
    ratio = adaptive / direct if adaptive and direct else None
    lines.append(f"{name:24s} {_percent(r.get('recall@1')):>6s} {_percent(r.get('recall@5')):>6s} "
                 f"{_percent(r.get('reason_rate')):>7s} {_number(adaptive, 1):>10s} "
                 f"{_number(direct, 1):>10s} {_number(ratio, 2):>6s}")
  lines.append(f"{'average (headline R@k)':24s} {_percent(report['average']):>6s}")
  return "\n".join(lines) + "\n"


def _number(value: float | None, digits: int) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def _task_label(name: str) -> str:
  """`"mscoco_task0"` -> `"0. qt→ci"`; the bare name when it has no known task suffix."""
  match = _TASK_SUFFIX_RE.search(name)
  if match is None or int(match.group(1)) not in mbeir.TASK_MODALITIES:
    return name
  task_id = int(match.group(1))
  query, cand = mbeir.TASK_MODALITIES[task_id]
  return f"{task_id}. {_short_modality('q', query)}→{_short_modality('c', cand)}"


def _short_modality(side: str, modality: str) -> str:
  """`("q", "text")` -> `"qt"`; `("c", "image,text")` -> `"(ci,ct)"`."""
  names = [side + letter for letter in _MODALITY_LETTERS[modality]]
  return names[0] if len(names) == 1 else f"({','.join(names)})"


def _dataset_label(name: str) -> str:
  """The dataset's display name from `mbeir.EVAL_TASKS_BY_NAME`, else the name's prefix."""
  task = mbeir.EVAL_TASKS_BY_NAME.get(name)
  return task.dataset if task is not None else _TASK_SUFFIX_RE.sub("", name)


def _percent(value: float | None) -> str:
  """A fraction as a percentage with one decimal; `-` for None."""
  return "-" if value is None else f"{100.0 * value:.1f}"
