"""Streamed requests: lazy images decoded by workers a bounded window ahead of admission, with
outputs token-identical to the eager path, and failed decodes reported, not lost or hung."""

import threading
import weakref

import numpy as np
import pytest

from tests.model import tiny
from trace_jax.generate import Engine, Request

GRID = (1, 4, 8)
IMAGE_IDS = [tiny.START] + [tiny.IMAGE] * 8 + [tiny.END]
# test_generate's shared-prefix engine: in one pytest process, its programs come from the cache.
ENGINE = dict(capacity=4, cache_len=64, max_new_tokens=6, chunk=3)


class Decoder:
  """Pixels of image `i` (deterministic), counting the decoded arrays alive at once."""

  def __init__(self, fail=()):
    self.fail, self.alive, self.peak, self.calls = set(fail), 0, 0, 0
    self._lock = threading.Lock()

  def pixels(self, i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal((32, 1176)).astype(np.float32)

  def lazy(self, i: int):
    def decode():
      with self._lock:
        self.calls += 1
      if i in self.fail:
        raise ValueError(f"cannot decode image {i}")
      x = self.pixels(i)
      with self._lock:
        self.alive += 1
        self.peak = max(self.peak, self.alive)
      weakref.finalize(x, self._died)
      return x
    return decode

  def _died(self):
    with self._lock:
      self.alive -= 1


def requests(n: int, pixels) -> list[Request]:
  """`n` prompts; the fourth is text only, the others show image i."""
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    text = list(rng.integers(0, 80, 2 + i % 3))
    image = i != 3
    out.append(Request((IMAGE_IDS if image else []) + text, pixels(i) if image else None,
                       seed=i, tag=i))
  return out


def test_lazy_images_stay_within_the_window_and_match_the_eager_path():
  """12 requests, 11 with images, through batches of 2 with a window of 2: never more than
  window + batch decoded images alive, each decoded once, and the tokens of the eager run."""
  model = tiny.model()
  decoder = Decoder()
  eager = {f.tag: f.tokens for f in Engine(model, **ENGINE).run(
    requests(12, decoder.pixels), grid=GRID, buckets=(32,), batch_size=2)}
  streamed = Engine(model, **ENGINE).run((r for r in requests(12, decoder.lazy)), grid=GRID,
                                         buckets=(32,), batch_size=2, prefetch=2)
  lazy = {f.tag: f.tokens for f in streamed}
  assert lazy == eager and len(lazy) == 12
  assert decoder.calls == 11 and 1 <= decoder.peak <= 2 + 2, decoder.peak
  assert decoder.alive == 0


def test_failed_decodes_go_to_on_error_or_stop_the_run():
  model = tiny.model()
  decoder = Decoder(fail={1, 5})
  failed = []
  got = {f.tag for f in Engine(model, **ENGINE).run(
    requests(8, decoder.lazy), grid=GRID, buckets=(32,), batch_size=2, prefetch=2,
    on_error=lambda r, e: failed.append((r.tag, str(e))))}
  assert failed == [(1, "cannot decode image 1"), (5, "cannot decode image 5")]
  assert got == set(range(8)) - {1, 5}
  with pytest.raises(ValueError, match="cannot decode image 1"):
    list(Engine(model, **ENGINE).run(requests(8, Decoder(fail={1}).lazy), grid=GRID,
                                     buckets=(32,), batch_size=2, prefetch=2))
