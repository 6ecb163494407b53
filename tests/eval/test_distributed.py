"""trace_jax.eval.distributed.agree: a failure in one process's encoding step reaches every
process at the end of the step (the allgather is faked: process 0's view of a 2-process run)."""

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils

from trace_jax.eval import distributed


class _Sent(Exception):
  """Stops `agree` once it has handed its buffer to the allgather."""


def _buffer_sent(monkeypatch, fn) -> np.ndarray:
  """The buffer `agree` sends the other processes when its step is `fn`."""
  def capture(buf):
    raise _Sent(np.asarray(buf))

  monkeypatch.setattr(multihost_utils, "process_allgather", capture)
  with pytest.raises(_Sent) as sent:
    distributed.agree("step", fn)
  return sent.value.args[0]


def _fails(message: str):
  def fn():
    raise ValueError(message)
  return fn


@pytest.fixture
def two(monkeypatch):
  """Process 0 of 2; `two(other)` makes the allgather return process 1's buffer `other`."""
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  ok = _buffer_sent(monkeypatch, lambda: None)

  def with_other(other=ok):
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda buf: np.stack([buf, other]))
  return with_other


def test_agree_returns_the_value_when_no_process_failed(two):
  two()
  assert distributed.agree("step", lambda: 7) == 7


def test_agree_raises_the_other_process_failure(two, monkeypatch):
  two(_buffer_sent(monkeypatch, _fails("8:57: cannot read an image from 'x.jpg'")))
  with pytest.raises(RuntimeError, match=r"^encoding pool: process 1 failed: ValueError: "
                                         r"8:57: cannot read an image from 'x\.jpg'$"):
    distributed.agree("encoding pool", lambda: 7)


def test_agree_raises_its_own_failure_after_telling_the_others(two):
  two()
  with pytest.raises(ValueError, match="^8:1: cannot read an image$"):
    distributed.agree("step", _fails("8:1: cannot read an image"))
