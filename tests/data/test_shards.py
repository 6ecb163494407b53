"""ArrayRecord shards: an exact round trip through TFDS (without TensorFlow), the same arrays as
path-based examples, grouping by task from the index, and no half-written output on errors."""

import dataclasses
import os
import pickle
import sys

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from tests.data import pipeline_fixture as fx
from trace_jax.data import shards, synthetic
from trace_jax.data.examples import TrainExample, load_split
from trace_jax.data.transforms import Shapes, ToArrays

SHAPES = Shapes(1024, 256, (1, 4, 4))  # Long enough for every demo-world example.


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("world"))
  synthetic.generate_world(root, n_train=40, n_test=8)
  return root


@pytest.fixture(scope="module")
def examples(world):
  files, cot_file = synthetic.split_files(world, "train")
  return load_split(world, [(f["query"], f["pool"]) for f in files.values()],
                    os.path.join(world, cot_file))


@pytest.fixture(scope="module")
def written(world, examples, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("out") / "ds")
  return shards.write_examples(examples, world, out, num_shards=2)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return fx.tokenizer(str(tmp_path_factory.mktemp("sp")))


def expected_record(ex: TrainExample, root: str) -> dict:
  """The example's dict plus the exact bytes of its image files."""
  d = ex.to_dict()
  for side in shards.SIDES:
    rel = d[f"{side}_image"]
    if rel is None:
      d[f"{side}_image_bytes"] = None
    else:
      with open(os.path.join(root, rel), "rb") as f:
        d[f"{side}_image_bytes"] = f.read()
  return d


def test_schema_covers_every_train_example_field():
  fields = {f.name for f in dataclasses.fields(TrainExample)}
  assert set(shards.TEXT) | {"task_id"} | set(shards.NOT_STORED) == fields
  assert set(shards.OPTIONAL) <= set(shards.TEXT)


def test_layout_is_a_tfds_dataset_read_without_tensorflow(written, examples):
  assert sorted(os.listdir(written.path)) == [
    "dataset_info.json", "features.json", "task_ids-train.npy",
    "trace_examples-train.array_record-00000-of-00002",
    "trace_examples-train.array_record-00001-of-00002"]
  builder = tfds.builder_from_directory(written.path)
  assert builder.info.name == "trace_examples" and str(builder.info.version) == shards.VERSION
  assert builder.info.splits["train"].shard_lengths == [20, 20] == list(written.shard_lengths)
  assert len(builder.as_data_source("train")) == len(examples) == 40
  assert written.task_counts == {0: 5, 3: 5, 6: 15, 7: 15}
  assert "tensorflow" not in sys.modules


def test_records_equal_examples_plus_image_bytes(written, examples, world):
  source = shards.ExampleSource(written.path)
  assert len(source) == len(examples)
  for i, ex in enumerate(examples):
    assert source[i] == expected_record(ex, world), ex.example_id
  got = source.__getitems__([3, 0])
  assert got == [expected_record(examples[3], world), expected_record(examples[0], world)]
  # The world exercises both None and inline images on each side.
  for side in shards.SIDES:
    assert {source[i][f"{side}_image_bytes"] is None for i in range(len(source))} == {True, False}


def test_to_arrays_same_from_inline_bytes_and_from_paths(written, examples, world, tok):
  source = shards.ExampleSource(written.path)
  by_path = ToArrays(tok, fx.model_config(tok), SHAPES, world)
  # A root with no files: the shard record must not touch the file system.
  inline = ToArrays(tok, fx.model_config(tok), SHAPES, os.path.join(world, "absent"))
  firsts = {t: idx[0] for t, idx in shards.examples_by_task(source).items()}
  for i in firsts.values():
    want, got = by_path.map(examples[i].to_dict()), inline.map(source[i])
    assert want.keys() == got.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{examples[i].example_id} {k}")


def test_grouping_by_task_and_grain_source(written, examples):
  source = shards.ExampleSource(written.path)
  want: dict[int, list[int]] = {}
  for i, ex in enumerate(examples):
    want.setdefault(ex.task_id, []).append(i)
  assert shards.examples_by_task(source) == want
  for task, subset in shards.split_by_task(source).items():
    ds = grain.MapDataset.source(subset)
    assert len(ds) == len(want[task])
    assert [r["example_id"] for r in ds] == [examples[i].example_id for i in want[task]]
  whole = grain.MapDataset.source(shards.ExampleSource(written.path)).shuffle(seed=0)
  assert sorted(r["example_id"] for r in whole) == sorted(e.example_id for e in examples)
  reopened = pickle.loads(pickle.dumps(source))  # What a Grain worker receives.
  assert reopened[7] == source[7] and repr(reopened) == repr(source)


def test_tfds_data_source_by_name(world, examples, tmp_path):
  shards.write_examples(examples[:3], world, str(tmp_path / "data" / "trace_examples" / "1.0.0"))
  ds = tfds.data_source("trace_examples", data_dir=str(tmp_path / "data"), split="train")
  assert len(ds) == 3
  assert shards.from_features(ds[2]) == expected_record(examples[2], world)


def test_none_and_empty_strings_stay_apart(world, examples, tmp_path):
  base = next(e for e in examples if e.cand_text is not None)
  odd = [dataclasses.replace(base, example_id="a", reasoning="", cand_text=""),
         dataclasses.replace(base, example_id="b", reasoning=None, cand_text=None,
                             query_text="héllo ✓")]
  source = shards.ExampleSource(shards.write_examples(odd, world, str(tmp_path / "ds")).path)
  assert [source[0], source[1]] == [expected_record(e, world) for e in odd]


def test_missing_image_names_the_example_and_leaves_nothing(world, examples, tmp_path):
  bad = dataclasses.replace(examples[-1], cand_image="mbeir_images/synthetic_images/nope.jpg")
  parent = tmp_path / "parent"
  with pytest.raises(FileNotFoundError, match=f"{bad.example_id}.*nope.jpg"):
    shards.write_examples(examples[:5] + [bad], world, str(parent / "ds"), num_shards=2)
  assert os.listdir(parent) == []


def test_default_shard_count(world, examples, tmp_path, monkeypatch):
  monkeypatch.setattr(shards, "EXAMPLES_PER_SHARD", 16)
  written = shards.write_examples(examples, world, str(tmp_path / "ds"))
  assert written.shard_lengths == (13, 13, 14)


def test_bad_arguments(world, examples, written, tmp_path):
  with pytest.raises(FileExistsError, match="already exists"):
    shards.write_examples(examples, world, written.path)
  for kw in (dict(num_shards=0), dict(num_shards=41), dict(name="Bad-Name"), dict(split="a/b")):
    with pytest.raises(ValueError):
      shards.write_examples(examples, world, str(tmp_path / "ds"), **kw)
  with pytest.raises(ValueError, match="no examples"):
    shards.write_examples([], world, str(tmp_path / "ds"))
  assert os.listdir(tmp_path) == []
  with pytest.raises(KeyError, match="no split 'test'"):
    shards.ExampleSource(written.path, split="test")
  with pytest.raises(FileNotFoundError, match="world.json"):
    synthetic.split_files(str(tmp_path), "train")


def test_reader_rejects_another_dataset(tmp_path):
  path = tmp_path / "other-train.array_record-00000-of-00001"
  feats = tfds.features.FeaturesDict({"x": tfds.features.Scalar(np.int32)})
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  writer.write(feats.serialize_example({"x": 1}))
  writer.close()
  tfds.folder_dataset.write_metadata(
    data_dir=str(tmp_path), features=feats, check_data=False,
    split_infos=[tfds.core.SplitInfo(name="train", shard_lengths=[1], num_bytes=0)])
  with pytest.raises(ValueError, match="not a trace_jax examples dataset"):
    shards.ExampleSource(str(tmp_path))
