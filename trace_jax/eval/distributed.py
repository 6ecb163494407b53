"""Evaluation over several processes: which items each process encodes, and how the pieces meet.

Every process encodes its own share of a pool and of a task's queries with its own copy of the
model on its own devices (no collective inside encoding: adaptive routing decodes a different
number of rows in each process). Shares are strided, item `i` to process `i % P`, so a share is
known without counting the file first and local row `j` of process `p` is item `j * P + p`.
The pieces meet in three small gathers per task: the query embeddings (every process scores all
queries against its share of the pool), each process's top-k (merged into the global top-k,
ties to the lower pool index as one process breaks them) and the per-query outputs for the
report. With one process every function here is the identity.

Failure inside encoding (an image that exists but does not decode, found only by the process
whose share holds it) is agreed on, not left to hang the others in their next gather: every
encoding step runs under `agree`, after which every process learns whether any failed. The
failing process raises its own error (naming the item); the others raise one naming that
process and its message, once they finish the same step (their completed pool chunks are kept
and reused by a rerun, `pools.py`).
"""

from __future__ import annotations

from typing import Callable, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils


_T = TypeVar("_T")
_MESSAGE_BYTES = 4096  # A failure's message, as sent to the other processes (cut to this).


def process_count() -> int:
  return jax.process_count()


def share(n: int) -> np.ndarray:
  """Indices of the items of `n` that this process encodes."""
  return np.arange(jax.process_index(), n, jax.process_count())


def gather_rows(local: np.ndarray, n: int) -> np.ndarray:
  """The [n, ...] array whose rows `share(n)` are each process's `local` rows, on every process."""
  p = jax.process_count()
  if p == 1:
    return np.asarray(local)
  rows = -(-n // p)  # Every process sends the same shape: its share padded to the longest.
  padded = np.zeros((rows, *local.shape[1:]), local.dtype)
  padded[:len(local)] = local
  every = np.asarray(multihost_utils.process_allgather(padded))  # [P, rows, ...]
  return np.swapaxes(every, 0, 1).reshape(rows * p, *local.shape[1:])[:n]


def gather_strings(local: list[str], n: int) -> list[str]:
  """`gather_rows` for strings (as UTF-8 bytes, padded to the longest)."""
  if jax.process_count() == 1:
    return list(local)
  data = [s.encode("utf-8") for s in local]
  width = int(np.max(multihost_utils.process_allgather(
    np.asarray(max(map(len, data), default=0)))))
  buf = np.zeros((len(data), max(width, 1)), np.uint8)
  lengths = np.zeros(len(data), np.int64)
  for i, b in enumerate(data):
    buf[i, :len(b)], lengths[i] = np.frombuffer(b, np.uint8), len(b)
  rows, sizes = gather_rows(buf, n), gather_rows(lengths, n)
  return [bytes(r[:s]).decode("utf-8") for r, s in zip(rows, sizes)]


def merge_top_k(scores: np.ndarray, index: np.ndarray, k: int,
                n_pool: int) -> tuple[np.ndarray, np.ndarray]:
  """The global top-k of every process's top-k over its share of the pool.

  Args:
    scores, index: [Q, k' <= k] best-first scores and *global* pool indices of this process's
      share.
    n_pool: the whole pool's size.
  Returns:
    (scores, index) [Q, min(k, n_pool)] over the whole pool, best first, equal scores in pool
    order.
  """
  if jax.process_count() == 1:
    return scores, index
  short = k - scores.shape[1]  # A share smaller than k: pad (never chosen over a real one).
  scores = np.pad(scores.astype(np.float32), ((0, 0), (0, short)), constant_values=-np.inf)
  index = np.pad(index.astype(np.int64), ((0, 0), (0, short)),
                 constant_values=np.iinfo(np.int64).max)
  every_s = np.asarray(multihost_utils.process_allgather(scores))  # [P, Q, k]
  every_i = np.asarray(multihost_utils.process_allgather(index))
  s = np.concatenate(list(every_s), axis=1)
  i = np.concatenate(list(every_i), axis=1)
  order = np.lexsort((i, -s), axis=1)[:, :min(k, n_pool)]
  return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)


def barrier(name: str) -> None:
  """Waits until every process gets here (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def agree(step: str, fn: Callable[[], _T]) -> _T:
  """Runs `fn` (a step every process runs, each on its share), then tells every process whether
  any failed (one allgather of a fixed-size message buffer).

  Returns:
    `fn()`'s value, when no process failed.
  Raises:
    The exception `fn` raised, in the process where it did.
    RuntimeError: `"{step}: process {p} failed: {its error}"` in the others.
  """
  if jax.process_count() == 1:
    return fn()
  try:
    result, error = fn(), None
  except Exception as e:  # Re-raised below, after the others are told.
    result, error = None, e
  text = f"{type(error).__name__}: {error}".encode("utf-8")[:_MESSAGE_BYTES] if error else b""
  buf = np.zeros(_MESSAGE_BYTES + 8, np.uint8)  # The length, then the message.
  buf[:8] = np.frombuffer(np.int64(len(text)).tobytes(), np.uint8)
  buf[8:8 + len(text)] = np.frombuffer(text, np.uint8)
  every = np.asarray(multihost_utils.process_allgather(buf))  # [P, 8 + _MESSAGE_BYTES]
  if error is not None:
    raise error
  for p, row in enumerate(every):
    size = int(row[:8].view(np.int64)[0])
    if size:
      message = bytes(row[8:8 + size]).decode("utf-8", "replace")
      raise RuntimeError(f"{step}: process {p} failed: {message}")
  return result
