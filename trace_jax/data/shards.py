"""Training examples as ArrayRecord shards with the images inline: a tensorflow-datasets dataset.

`write_examples` turns `TrainExample`s into one split of a TFDS dataset directory, reading each
example's image files from the M-BEIR root into the record, so a pod streams a few large files from
a bucket instead of opening millions of small ones. `ExampleSource` reads it back as a Grain
random-access source whose records are what `transforms.ToArrays` takes: the `TrainExample`
fields plus `query_image_bytes` / `cand_image_bytes` (the encoded file, or None). `split_by_task`
groups the records by task from a small index, without reading any record. This module does not
decode images, tokenize or shuffle; building examples is `examples.py`'s job, batching
`pipeline.py`'s.

Layout of `out_dir` (a TFDS dataset directory, read with `tfds.builder_from_directory(out_dir)`;
copied to `DATA_DIR/<name>/1.0.0` it is also `tfds.data_source(name, data_dir=DATA_DIR)`):

  dataset_info.json, features.json              TFDS metadata; the features are `features()`
  <name>-<split>.array_record-000NN-of-000MM    records in the order of the examples given
  task_ids-<split>.npy                          int32 task id of every record, in record order

Why no `GeneratorBasedBuilder`: without TensorFlow, TFDS's writer works only while a split fits its
1 GB in-memory shuffle buffer (tensorflow_datasets/core/shuffle.py); past it, it spills to disk
through `tf.io.gfile` and fails. So the shards are written here with `ArrayRecordWriter` (with the
option TFDS's `ArrayRecordFileAdapter.write_examples` uses), each record serialized by the TFDS
features themselves, and described with `tfds.folder_dataset.write_metadata`, TFDS's documented
path for files written outside a builder. TFDS then reads them like any dataset it built.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import tempfile
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from etils import epath

from trace_jax.data import mbeir
from trace_jax.data.examples import TrainExample

VERSION = "1.0.0"
EXAMPLES_PER_SHARD = 1024  # Default shard size (not tuned: pick --num_shards for real data).
# TrainExample fields that may be None: stored as "" with `has_<field>` False.
OPTIONAL = ("query_image", "reasoning", "cand_text", "cand_image")
TEXT = ("example_id", "qid", "query_text", "cand_id") + OPTIONAL
# TrainExample fields the schema does not hold (candidate-side targets and hard negatives come from
# the M-BEIR files only): an example that sets one is refused when written.
NOT_STORED = ("cand_reasoning", "neg_id", "neg_text", "neg_image")
SIDES = ("query", "cand")
_WRITER_OPTIONS = "group_size:1"  # One record per chunk: cheap random access (as TFDS writes).
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def features() -> tfds.features.FeaturesDict:
  """The record schema: `TrainExample`'s text fields, a `has_<field>` flag for each optional one,
  the task id, and each side's encoded image file (b"" when the side has no image)."""
  f = tfds.features
  spec: dict[str, Any] = {k: f.Text() for k in TEXT}
  spec.update({f"has_{k}": f.Scalar(np.bool_) for k in OPTIONAL})
  spec["task_id"] = f.Scalar(np.int32)
  # np.object_ scalars are TFDS's string tensors: raw bytes, no TensorFlow needed to encode.
  spec.update({f"{s}_image_bytes": f.Tensor(shape=(), dtype=np.object_) for s in SIDES})
  return f.FeaturesDict(spec)


def index_name(split: str) -> str:
  """File name of a split's task-id index inside the dataset directory."""
  return f"task_ids-{split}.npy"


# ---------------------------------------------------------------------------------- writing


@dataclasses.dataclass(frozen=True)
class Written:
  """What `write_examples` wrote."""
  path: str
  shard_lengths: tuple[int, ...]
  num_bytes: int
  task_counts: dict[int, int]  # Task id -> records.


def _image_bytes(ex: TrainExample, side: str, root: str) -> bytes:
  """The encoded image file of one side, or b"" when it has none."""
  rel = getattr(ex, f"{side}_image")
  if rel is None:
    return b""
  try:
    with open(mbeir.resolve_image(root, rel), "rb") as f:
      return f.read()
  except (OSError, ValueError) as e:
    raise type(e)(f"example {ex.example_id} (query {ex.qid}): {side} image: {e}") from e


def to_features(ex: TrainExample, root: str) -> dict[str, Any]:
  """An example as a `features()` dict, its images read from `root`.

  Raises:
    FileNotFoundError: an image is missing (names the example id and the path).
    ValueError: the example has a candidate-side target, which the schema does not hold.
  """
  for k in NOT_STORED:
    if getattr(ex, k) is not None:
      raise ValueError(f"example {ex.example_id}: shards do not hold {k} (candidate-side "
                       "reasoning, data.cand_target, and hard negatives, data.hard_negatives, "
                       "train from the M-BEIR files)")
  d = ex.to_dict()
  out: dict[str, Any] = {k: d[k] if d[k] is not None else "" for k in TEXT}
  out.update({f"has_{k}": d[k] is not None for k in OPTIONAL})
  out["task_id"] = ex.task_id
  out.update({f"{s}_image_bytes": _image_bytes(ex, s, root) for s in SIDES})
  return out


def from_features(f: dict[str, Any]) -> dict[str, Any]:
  """A decoded `features()` record -> the record dict `ToArrays` takes (strings as str, None
  restored, `<side>_image_bytes` as bytes or None)."""
  record: dict[str, Any] = {k: f[k].decode("utf-8") for k in TEXT}
  record.update({k: None for k in OPTIONAL if not f[f"has_{k}"]})
  record.update({k: None for k in NOT_STORED})  # Never set in a shard (refused when written).
  record["task_id"] = int(f["task_id"])
  for s in SIDES:
    has_image = record[f"{s}_image"] is not None
    record[f"{s}_image_bytes"] = bytes(f[f"{s}_image_bytes"]) if has_image else None
  return record


def _check_args(n: int, out_dir: str, name: str, split: str, num_shards: int) -> None:
  if not n:
    raise ValueError("no examples to write")
  if not 1 <= num_shards <= n:
    raise ValueError(f"num_shards={num_shards}; expected 1 to {n} (the number of examples)")
  for what, value in (("name", name), ("split", split)):
    if not _NAME.fullmatch(value):
      raise ValueError(f"{what}={value!r}; expected lower-case letters, digits and '_'")
  if os.path.exists(out_dir):
    raise FileExistsError(f"output directory already exists: {out_dir}")


def _write_shards(examples: Sequence[TrainExample], root: str,
                  template: tfds.core.ShardedFileTemplate, num_shards: int) -> list[int]:
  """Writes contiguous, near-equal runs of `examples` to the shard files; returns their lengths."""
  feats = features()
  n = len(examples)
  bounds = [k * n // num_shards for k in range(num_shards + 1)]
  for path, start, stop in zip(template.sharded_filepaths(num_shards), bounds, bounds[1:]):
    writer = array_record_module.ArrayRecordWriter(os.fspath(path), _WRITER_OPTIONS)
    try:
      for ex in examples[start:stop]:
        writer.write(feats.serialize_example(to_features(ex, root)))
    finally:
      writer.close()
  return [stop - start for start, stop in zip(bounds, bounds[1:])]


def write_examples(examples: Sequence[TrainExample], root: str, out_dir: str, *,
                   name: str = "trace_examples", split: str = "train",
                   num_shards: int | None = None) -> Written:
  """Writes `examples`, images inline, as split `split` of a new TFDS dataset at `out_dir`.

  Everything is written to a temporary sibling directory renamed to `out_dir` at the end, so on
  any error no `out_dir` (and no temporary directory) is left behind.

  Args:
    examples: the records, in the order they are stored.
    root: the M-BEIR root that the examples' image paths are relative to.
    out_dir: the dataset directory to create (local; copy it to a bucket afterwards).
    name: the TFDS dataset name, which prefixes the shard files.
    split: the split name.
    num_shards: number of ArrayRecord files (default: one per `EXAMPLES_PER_SHARD` examples).

  Returns:
    The path, shard lengths, bytes written and records per task.

  Raises:
    FileNotFoundError: an image is missing (names the example id and the path).
    FileExistsError: `out_dir` exists.
    ValueError: no examples, `num_shards` outside 1..len(examples), or a bad name or split.
  """
  out_dir = os.path.abspath(out_dir)
  if num_shards is None:
    num_shards = max(1, math.ceil(len(examples) / EXAMPLES_PER_SHARD))
  _check_args(len(examples), out_dir, name, split, num_shards)
  parent, base = os.path.split(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{base}.incomplete-", dir=parent)
  try:
    template = tfds.core.ShardedFileTemplate(
      data_dir=epath.Path(tmp), template=tfds.core.naming.DEFAULT_FILENAME_TEMPLATE,
      dataset_name=name, split=split, filetype_suffix="array_record")
    lengths = _write_shards(examples, root, template, num_shards)
    num_bytes = sum(os.path.getsize(p) for p in template.sharded_filepaths(num_shards))
    tfds.folder_dataset.write_metadata(
      data_dir=tmp, features=features(), version=VERSION, filename_template=template,
      split_infos=[tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=num_bytes)],
      check_data=False,  # TFDS's check reads through tf.data; tests read it back instead.
      description=f"TRACE training examples with images inline, converted from {root}.",
      disable_shuffling=True)  # Record order is the examples' order: readers may rely on it.
    task_ids = np.asarray([ex.task_id for ex in examples], np.int32)
    np.save(os.path.join(tmp, index_name(split)), task_ids)
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  tasks, counts = np.unique(task_ids, return_counts=True)
  return Written(out_dir, tuple(lengths), num_bytes,
                 {int(t): int(c) for t, c in zip(tasks, counts)})


# ---------------------------------------------------------------------------------- reading


class ExampleSource:
  """Random-access records of one split of a `write_examples` directory; a Grain data source
  (`grain.MapDataset.source(ExampleSource(path))`). Pickles by path, so Grain workers reopen it.

  Raises (on construction):
    ValueError: the directory's features are not `features()`.
    KeyError: the split is not in the directory.
  """

  def __init__(self, path: str, split: str = "train"):
    self.path, self.split = os.fspath(path), split
    builder = tfds.builder_from_directory(self.path)
    stored, expected = set(builder.info.features.keys()), set(features().keys())
    if stored != expected:
      raise ValueError(f"{self.path} is not a trace_jax examples dataset: features missing "
                       f"{sorted(expected - stored)}, unexpected {sorted(stored - expected)}")
    if split not in builder.info.splits:
      raise KeyError(f"{self.path} has no split {split!r}; it has {list(builder.info.splits)}")
    self._records = builder.as_data_source(split)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return from_features(self._records[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [from_features(f) for f in self._records.__getitems__(indices)]

  def __getstate__(self) -> dict[str, str]:
    return {"path": self.path, "split": self.split}

  def __setstate__(self, state: dict[str, str]) -> None:
    self.__init__(state["path"], state["split"])

  def __repr__(self) -> str:
    return f"ExampleSource({self.path!r}, split={self.split!r})"

  def task_ids(self) -> np.ndarray:
    """int32 [len(self)]: the task id of every record, from the index file (no record is read)."""
    with (epath.Path(self.path) / index_name(self.split)).open("rb") as f:
      ids = np.load(f)
    if ids.shape != (len(self),):
      raise ValueError(f"{self.path}: {index_name(self.split)} holds {ids.shape} task ids for "
                       f"{len(self)} records")
    return ids


class Subset:
  """The records `indices` of a random-access source, as a random-access source itself."""

  def __init__(self, source, indices: Sequence[int]):
    self.source, self.indices = source, list(indices)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.source[self.indices[index]]

  def __repr__(self) -> str:
    return f"Subset({self.source!r}, {len(self)} records)"


def examples_by_task(source: ExampleSource) -> dict[int, list[int]]:
  """Task id -> indices of its records, in record order; reads only the task-id index."""
  ids = source.task_ids()
  return {int(t): np.flatnonzero(ids == t).tolist() for t in np.unique(ids)}


def split_by_task(source: ExampleSource) -> dict[int, Subset]:
  """Task id -> a source of that task's records: what the pipeline builds one stream per task
  from (`pipeline.make_dataset` does the same with lists of in-memory example dicts)."""
  return {t: Subset(source, idx) for t, idx in examples_by_task(source).items()}
