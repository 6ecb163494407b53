"""The Grain training pipeline: examples -> shuffled, task-mixed, per-process, padded host batches
-> global `jax.Array`s.

Order of operations: per-task source -> deterministic seeded shuffle (reshuffled each epoch) ->
repeat -> task mixture (`data.task_weights`; or whole batches of one task with
`data.one_task_per_batch`) -> shard by JAX process -> `ToArrays` (decode, tokenize, positions) ->
drop-and-count skipped bad examples -> batch and pad into a length bucket -> global arrays.

Bookkeeping rides in each host batch next to the arrays: how many bad examples were skipped
before its rows (`SKIPPED`) and why (`SKIP_REASONS`: "<file>:<line> (query <qid>): <error>"),
and which of its texts were cut to fit (`TRUNCATED`). A process that skips more than
`max_skip_fraction` of any `skip_window` examples it draws stops with an error naming the last
reasons (so a source of only bad examples cannot loop forever).

A side without images carries no pixels, and the step then runs no vision tower for it (rather
than over blank images): with `one_task_per_batch`, a batch whose task has no image on that side
(text queries of tasks 0-2, text candidates of tasks 1, 3, 6); in mixed batches, a side on which
no task of the mixture has images. Either rule is the same in every process (tasks are drawn in
lockstep across data shards), so all processes run the same program without agreeing first.
A mixed batch's side that has pixels runs the tower on every row, blank pixels for the rows
without an image (docs/benchmarks.md, "The vision tower in mixed training batches").

Buckets: a batch is padded to the smallest of `data.query_buckets` (and `data.cand_buckets`) that
holds its longest sequence, so the train step compiles at most len(query) x len(cand) programs;
images are always resized to the one `data.image_grid`. Each process pads its own rows, so
`to_global` first pads every process's rows to the widest bucket any of them picked (one small
all-gather of the widths per step, with more than one process): a global array has one shape. The
iterator's state (`get_state` / `set_state`, or Orbax via grain's checkpoint handler) restores the
exact next batch.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
from typing import Any, Mapping, Sequence

import grain
import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from trace_jax.data import mbeir
from trace_jax.data.batch import SIDES, batch_shardings
from trace_jax.data.examples import TrainExample
from trace_jax.data.transforms import BAD, TRUNCATED, ToArrays
from trace_jax.model.positions import vision_layout

SKIPPED = "data/skipped_examples"
SKIP_REASONS = "data/skip_reasons"
BOOKKEEPING = (SKIPPED, SKIP_REASONS, TRUNCATED)  # Host-batch keys that are not model inputs.


class TooManyBadExamplesError(RuntimeError):
  """More than the allowed fraction of a window of examples was bad."""


@dataclasses.dataclass(frozen=True)
class Buckets:
  query: tuple[int, ...]
  cand: tuple[int, ...]

  @staticmethod
  def pick(length: int, sizes: tuple[int, ...]) -> int:
    for size in sorted(sizes):
      if length <= size:
        return size
    raise ValueError(f"sequence of {length} tokens exceeds the largest bucket {max(sizes)}")


class _SkipBadIterator(grain.DatasetIterator):
  """Drops `BAD` markers, handing their reasons to the next good element; stops when more than
  `max_fraction` of a window of `window` drawn examples is bad (the window starts afresh after a
  restore: the iterator state is the parent's)."""

  def __init__(self, parent, max_fraction: float, window: int):
    super().__init__(parent)
    self.max_fraction, self.max_bad = max_fraction, int(max_fraction * window)
    self.window, self.drawn, self.bad, self.recent = window, 0, 0, []

  def __next__(self):
    reasons = []
    while True:
      element = next(self._parent)
      self.drawn += 1
      if BAD in element:
        reasons.append(element[BAD])
        self.bad += 1
        self.recent = (self.recent + [element[BAD]])[-5:]
        if self.bad > self.max_bad:
          raise TooManyBadExamplesError(
            f"{self.bad} bad examples among the last {self.drawn} drawn by this process, more "
            f"than data.max_skip_fraction={self.max_fraction:g} of a window of "
            f"{self.window}; the last ones: " + "; ".join(self.recent))
      if self.drawn >= self.window:
        self.drawn = self.bad = 0
      if BAD not in element:
        return dict(element, **{SKIP_REASONS: reasons})

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class _SkipBad(grain.IterDataset):
  def __init__(self, parent, max_fraction: float, window: int):
    super().__init__(parent)
    self.max_fraction, self.window = max_fraction, window

  def __iter__(self):
    return _SkipBadIterator(self._parent.__iter__(), self.max_fraction, self.window)


def image_sides(tasks: Sequence[int]) -> frozenset[str]:
  """The sides on which some task of `tasks` has images (M-BEIR task ids; unknown ids: all);
  hard negatives (`neg`) are candidates."""
  out = set()
  for task in tasks:
    query, cand = mbeir.TASK_MODALITIES.get(task, ("image", "image"))
    out.update(side for side, modality in (("query", query), ("cand", cand), ("neg", cand))
               if "image" in modality.split(","))
  return frozenset(out)


def pad_batch(examples: Sequence[dict[str, Any]], buckets: Buckets,
              with_pixels: frozenset[str] | None = None) -> dict[str, Any]:
  """Stacks examples, padding token fields to the batch's bucket (pad id 0, mask 0), and the
  bookkeeping keys. Pixels for the sides in `with_pixels` (zeros for a row without an image);
  None: for the sides where some row has an image (a batch of one task)."""
  out: dict[str, Any] = {}
  for side, sizes in (("query", buckets.query), ("cand", buckets.cand), ("neg", buckets.cand)):
    if f"{side}_ids" not in examples[0]:  # No candidates (LM-only pretraining), no negatives.
      continue
    lengths = [len(e[f"{side}_ids"]) for e in examples]
    t = Buckets.pick(max(lengths), sizes)
    b = len(examples)
    ids = np.zeros((b, t), np.int32)
    mask = np.zeros((b, t), np.int32)
    positions = np.zeros((3, b, t), np.int32)
    has_target = f"{side}_target_mask" in examples[0]  # Queries; candidates when they reason.
    target = np.zeros((b, t), np.int32)
    for i, (e, n) in enumerate(zip(examples, lengths)):
      ids[i, :n], mask[i, :n] = e[f"{side}_ids"], 1
      positions[:, i, :n] = e[f"{side}_positions"]
      if has_target:
        target[i, :n] = e[f"{side}_target_mask"]
    out.update({f"{side}_ids": ids, f"{side}_mask": mask, f"{side}_positions": positions})
    if side in with_pixels if with_pixels is not None else any(
        e[f"{side}_has_image"] for e in examples):
      out[f"{side}_pixels"] = np.stack([e[f"{side}_pixels"] for e in examples])
    if has_target:
      out[f"{side}_target_mask"] = target
  for key in ("query_is_reasoning", "task_id", "cand_key", "neg_key"):
    if key in examples[0]:
      out[key] = np.asarray([e[key] for e in examples], np.int32)
  reasons = [r for e in examples for r in e.get(SKIP_REASONS, ())]
  out.update({SKIPPED: np.int32(len(reasons)), SKIP_REASONS: reasons,
              TRUNCATED: [e[TRUNCATED] for e in examples if e.get(TRUNCATED)]})
  return out


class ExampleRecords(collections.abc.Sequence):
  """A task's examples as a random-access source of records (dicts), each made when it is read:
  the examples are held once, not beside a dict copy of each."""

  def __init__(self, examples: list[TrainExample]):
    self.examples = examples

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [ex.to_dict() for ex in self.examples[index]]
    return self.examples[index].to_dict()


def group_by_task(examples: Sequence[TrainExample]) -> dict[int, ExampleRecords]:
  """Example records (dicts, made as they are read) per task id."""
  by_task: dict[int, list[TrainExample]] = {}
  for ex in examples:
    by_task.setdefault(ex.task_id, []).append(ex)
  return {t: ExampleRecords(exs) for t, exs in by_task.items()}


class _ConcatIterator(grain.DatasetIterator):
  """Concatenates one list of examples from each shard stream, in shard order, then pads."""

  def __init__(self, parents, batch_fn):
    super().__init__(parents)
    self.batch_fn = batch_fn

  def __next__(self):
    return self.batch_fn([x for it in self._parents for x in next(it)])

  def get_state(self):
    return {"shards": [it.get_state() for it in self._parents]}

  def set_state(self, state):
    for it, s in zip(self._parents, state["shards"]):
      it.set_state(s)


class _Concat(grain.IterDataset):
  def __init__(self, parents, batch_fn):
    super().__init__(parents)
    self.batch_fn = batch_fn

  def __iter__(self):
    return _ConcatIterator([p.__iter__() for p in self.parents], self.batch_fn)


def _task_source(records: Sequence[dict], seed: int, shard: int, num_shards: int):
  """One data shard's fixed share of one task, shuffled anew each epoch, repeated forever."""
  share = grain.MapDataset.source(records)[shard::num_shards]
  if not len(share):
    raise ValueError(f"data shard {shard} of {num_shards} gets no example of a task with "
                     f"{len(records)} examples")
  return share.shuffle(seed=seed).repeat()


def _shard_stream(by_task, tasks, weights, to_arrays, per_shard: int, seed: int, shard: int,
                  num_shards: int, one_task_per_batch: bool,
                  skip: tuple[float, int]) -> grain.IterDataset:
  """Lists of `per_shard` good examples of one data shard; `skip`: (max fraction, window)."""
  sources = [_task_source(by_task[t], seed + t, shard, num_shards) for t in tasks]
  as_list = dict(batch_size=per_shard, drop_remainder=True, batch_fn=list)
  if one_task_per_batch:
    streams = [_SkipBad(s.map(to_arrays).to_iter_dataset(), *skip).batch(**as_list)
               for s in sources]
    return grain.IterDataset.mix(streams, weights)
  mixed = grain.MapDataset.mix(sources, weights).map(to_arrays)
  return _SkipBad(mixed.to_iter_dataset(), *skip).batch(**as_list)


def make_dataset(by_task: Mapping[int, Sequence[dict]], to_arrays: ToArrays, buckets: Buckets, *,
                 batch_size: int, seed: int, task_weights: dict[int, float] | None = None,
                 one_task_per_batch: bool = False, shards: Sequence[int] = (0,),
                 num_shards: int = 1, workers: int = 0, max_skip_fraction: float = 0.1,
                 skip_window: int = 1000) -> grain.IterDataset:
  """An endless dataset of this process's padded host batches (`batch_size` rows each).

  The data is split into `num_shards` fixed shards; this process reads `shards` (contiguous, in
  order), `batch_size / len(shards)` rows from each. A given global batch is therefore the same
  whatever the number of processes, as long as `num_shards` is.

  Args:
    by_task: random-access records per task id: example dicts (`group_by_task`), or
      ArrayRecord subsets (`shards.split_by_task`) with the images inline.
    task_weights: sampling weight per task id (default: proportional to the task's size).
    one_task_per_batch: draw whole batches from one task at a time, by `task_weights`.
    workers: Grain worker processes (0: decode in this process).
    max_skip_fraction, skip_window: bad examples skipped (`ToArrays(on_bad_example="skip")`)
      may be at most this fraction of any window of this many examples a data shard draws.
  """
  tasks = sorted(by_task)
  unknown = set(task_weights or {}) - set(tasks)
  if unknown:
    raise ValueError(f"data.task_weights names tasks {sorted(unknown)} that have no examples")
  weight = {t: float((task_weights or {}).get(t, 0.0 if task_weights else len(by_task[t])))
            for t in tasks}
  tasks = [t for t in tasks if weight[t] > 0]  # A zero weight leaves the task out.
  if not tasks:
    raise ValueError("data.task_weights gives every task weight 0")
  weights = [weight[t] for t in tasks]
  if batch_size % len(shards):
    raise ValueError(f"a host batch of {batch_size} does not split over {len(shards)} shards")
  if not 0.0 <= max_skip_fraction < 1.0 or skip_window < 1:
    raise ValueError(f"data.max_skip_fraction={max_skip_fraction} must be in [0, 1) and "
                     f"data.skip_window={skip_window} positive")
  streams = [_shard_stream(by_task, tasks, weights, to_arrays, batch_size // len(shards), seed, s,
                           num_shards, one_task_per_batch, (max_skip_fraction, skip_window))
             for s in shards]
  with_pixels = None if one_task_per_batch else image_sides(tasks)
  ds = _Concat(streams, lambda xs: pad_batch(xs, buckets, with_pixels))
  if workers:
    if not flags.FLAGS.is_parsed():  # grain 0.2.18 workers read absl flags (upstream bug).
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(num_workers=workers))
  return ds


@functools.lru_cache(maxsize=8)
def _bucket_layout(vision_cfg, windowed: bool, image_grid: tuple[int, ...]):
  """The vision layout of one bucket's image grid (the same for every step: computed once)."""
  return vision_layout(np.asarray([image_grid]), vision_cfg, windowed=windowed)


def widths(host_batch: dict[str, Any]) -> dict[str, int]:
  """Each side's token width (its bucket) agreed by every process: the widest any picked."""
  sides = [s for s in SIDES if f"{s}_ids" in host_batch]
  mine = np.asarray([host_batch[f"{s}_ids"].shape[1] for s in sides], np.int32)
  if jax.process_count() > 1:
    mine = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, len(sides)).max(0)
  return dict(zip(sides, mine.tolist()))


def pad_to(host_batch: dict[str, Any], width: dict[str, int]) -> dict[str, Any]:
  """The batch with each side's token fields (ids, masks, positions) padded to `width[side]`
  as `pad_batch` pads them (id 0, mask 0, position 0)."""
  out = dict(host_batch)
  for side, t in width.items():
    for field in ("ids", "mask", "target_mask", "positions"):
      x = out.get(f"{side}_{field}")
      if x is not None and x.shape[-1] < t:
        out[f"{side}_{field}"] = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, t - x.shape[-1])])
  return out


def to_global(host_batch: dict[str, np.ndarray], mesh, model_cfg, image_grid) -> dict:
  """This process's rows -> global `jax.Array`s sharded like the train step expects (each side
  at the bucket every process agreed on, `widths`), plus the (replicated) vision layout of the
  bucket's image grid for each side that has pixels."""
  layout = _bucket_layout(model_cfg.vision, model_cfg.family == "qwen2_5_vl", tuple(image_grid))
  host_batch = pad_to(host_batch, widths(host_batch))
  batch = {k: v for k, v in host_batch.items() if k not in BOOKKEEPING + ("task_id",)}
  batch.update({f"{side}_layout": layout for side in ("query", "cand", "neg")
                if f"{side}_pixels" in batch})
  shardings = batch_shardings(batch, mesh)

  def one(x, sharding):
    if sharding.spec == jax.sharding.PartitionSpec():
      return jax.device_put(np.asarray(x), sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))
  return jax.tree.map(one, batch, shardings)
