"""Retrying rejected teacher outputs: which attempt each reason query needs next, and which of its
attempts the merge keeps. Plain bookkeeping over the phases' shards; it runs no model.

An attempt is rejected when its output fails `build_cot`'s structure rule or the verifier's
confidence is at or below `config.min_confidence` (the threshold `build_cot --min_confidence`
applies). Attempt k of a query samples with `seed_of(qid, config.seed + k)`, so what each
attempt writes does not depend on which process ran it or when. The next attempt of a query is
decided only from its verified attempts (which no process writes while generating), so every
process computes the same list and takes the same strided share of it. Retrying needs sampling:
with greedy decoding (`generate.temperature == 0`) a retry would repeat the output, so there is
one attempt (said once in the log).
"""

from __future__ import annotations

import collections
import functools
import logging
from typing import Iterable, Sequence

from trace_jax.data import cot
from trace_jax.teach import shards
from trace_jax.teach.items import TeachItem

_log = logging.getLogger(__name__)


@functools.cache
def _greedy_note(requested: int) -> None:
  _log.warning("max_attempts=%d but generate.temperature=0 (greedy): a retry would repeat the "
               "same output, so rejected outputs are not retried", requested)


def max_attempts(config) -> int:
  """Attempts per query: `config.max_attempts` with sampling, 1 with greedy decoding."""
  if config.max_attempts > 1 and config.generate.temperature <= 0:
    _greedy_note(config.max_attempts)
    return 1
  return max(1, config.max_attempts)


def rejected(output: str, confidence: float | None, min_confidence: float) -> bool:
  """Whether an attempt is rejected (one with no confidence yet is not judged: False)."""
  if cot.check_structure(output) is not None:
    return True
  return confidence is not None and confidence <= min_confidence


def by_attempt(records: Iterable[dict], fields: Sequence[str]) -> dict[str, dict[int, dict]]:
  """qid -> attempt -> the record's `fields` (those it has): a phase holds every query's
  records, so only what it reads is kept."""
  out = collections.defaultdict(dict)
  for r in records:
    qid, attempt = shards.attempt_key(r)
    out[qid][attempt] = {f: r[f] for f in fields if f in r}
  return out


def next_attempts(config, out_dir: str, items: list[TeachItem]) -> dict[str, int]:
  """The attempt each query of `items` (reason queries) needs: 0 when none of its attempts was
  verified yet (done or not: the shards say), the next when its last verified attempt was
  rejected and attempts remain; a query needing none is left out."""
  generated = by_attempt(shards.read(out_dir, "generated"), ("teacher_output",))
  verified = by_attempt(shards.read(out_dir, "verified"), ("confidence",))
  limit, out = max_attempts(config), {}
  for it in items:
    judged = verified.get(it.qid)
    if not judged:
      out[it.qid] = 0
      continue
    last = max(judged)
    output = generated[it.qid][last]["teacher_output"]
    if last + 1 < limit and rejected(output, judged[last].get("confidence"),
                                     config.min_confidence):
      out[it.qid] = last + 1
  return out


def chosen(generated: dict[int, dict], verified: dict[int, dict],
           min_confidence: float) -> int:
  """The attempt the merge keeps: the first verified and not rejected, else the last."""
  for attempt in sorted(generated):
    confidence = verified.get(attempt, {}).get("confidence")
    if confidence is not None and not rejected(generated[attempt]["teacher_output"], confidence,
                                               min_confidence):
      return attempt
  return max(generated)
