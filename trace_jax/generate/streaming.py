"""Requests streamed into the engine: a bounded window over an iterable of `Request`s whose
images are decoded by worker threads just ahead of their admission.

A `Request` whose `pixels` is a zero-argument function (e.g. reading and resizing its image file)
is lazy: `Window` calls the function on a worker thread when the request enters the window, and
hands the request out, with the decoded pixels, when the engine admits it. The window holds at
most `depth` requests, so at most `depth` decoded images wait, plus the batch being prefilled:
a teacher over 575K queries never holds their images (about 1.2 MB each at the 16x16 grid) at
once. A decode that raises goes to the caller's `on_error` in the engine's thread (a skip it
counts, or an error it raises), never to a worker that dies or a queue that hangs.

This module runs no model and pads nothing (`batching.py` packs what it hands out).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from typing import Any, Callable, Iterable

_END = object()
OnError = Callable[[Any, Exception], None]  # (the failed request, its error); raise to stop.


def is_lazy(request) -> bool:
  """Whether the request's pixels are still a function to call."""
  return callable(request.pixels)


class Window:
  """At most `depth` requests read ahead of the engine, their lazy images decoding on `workers`
  threads (started at the first lazy request). Requests come out in the order they came in,
  except that a batch takes only requests of its first request's kind (with or without an
  image) and leaves the others for later batches."""

  def __init__(self, requests: Iterable, depth: int, workers: int = 2,
               on_error: OnError | None = None):
    if depth < 1 or workers < 1:
      raise ValueError(f"depth={depth}, workers={workers}: expected >= 1")
    self.depth, self.workers, self.on_error = depth, workers, on_error
    self._source = iter(requests)
    self._ended = False
    self._window: collections.deque = collections.deque()  # (request, future or None)
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None

  def __len__(self) -> int:
    """Requests in the window (all that remain once the source has ended)."""
    self._fill()
    return len(self._window)

  def __bool__(self) -> bool:
    return len(self) > 0

  def take(self, n: int) -> list:
    """Up to `n` requests from the front of the window, all of the first one's kind, their
    images decoded (waiting for them); requests whose decode failed are given to `on_error` and
    left out (so fewer, even none, may come back). The window then refills, so its next images
    decode while this batch runs."""
    self._fill()
    if not self._window:
      return []
    kind = self._window[0][0].pixels is None
    picked, kept = [], collections.deque()
    while self._window and len(picked) < n:
      entry = self._window.popleft()
      (picked if (entry[0].pixels is None) == kind else kept).append(entry)
    self._window.extendleft(reversed(kept))
    out = [r for r in (self._resolve(r, f) for r, f in picked) if r is not None]
    del picked  # The futures hold the decoded images too.
    self._fill()
    return out

  def close(self) -> None:
    """Stops the workers (decodes not started are cancelled; running ones end)."""
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None
    self._window.clear()

  def _fill(self) -> None:
    while not self._ended and len(self._window) < self.depth:
      r = next(self._source, _END)
      if r is _END:
        self._ended = True
        break
      future = None
      if is_lazy(r):
        if self._pool is None:
          self._pool = concurrent.futures.ThreadPoolExecutor(self.workers,
                                                             thread_name_prefix="decode")
        future = self._pool.submit(r.pixels)
      self._window.append((r, future))

  def _resolve(self, r, future):
    """`r` with its decoded pixels, or None after `on_error` took its failure."""
    if future is None:
      return r
    try:
      return dataclasses.replace(r, pixels=future.result())
    except Exception as e:  # noqa: BLE001 (the caller's on_error decides what a failure is)
      if self.on_error is None:
        raise
      self.on_error(r, e)
      return None
