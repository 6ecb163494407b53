"""From a config to training data: the end-of-reasoning marker, candidate-side reasoning and hard
negatives (`data.reasoning_marker`, `data.cand_target`, `data.hard_negatives`) on the demo
world."""

import os

import numpy as np
import pytest
from ml_collections import ConfigDict

from configs import common, demo
from trace_jax.data import setup as data_setup
from trace_jax.data import mbeir, shards, synthetic
from trace_jax.data.pipeline import Buckets, pad_batch
from trace_jax.data.tokenizer import EOR_TOKEN
from trace_jax.data.transforms import Shapes, ToArrays
from trace_jax.model.config import ModelConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> ConfigDict:
  c = common.base_config().data
  c.root = str(tmp_path_factory.mktemp("world"))
  synthetic.generate_world(c.root, n_train=40, n_test=8)
  files, c.cot_file = synthetic.split_files(c.root, "train")
  c.train_files = tuple((f["query"], f["pool"]) for f in files.values())
  c.tokenizer_vocab = 512
  return c


def test_marker_tokenizer_is_a_separate_file_with_one_more_symbol(data):
  plain = data_setup.make_tokenizer(data)
  with pytest.raises(KeyError):
    plain.token_to_id(EOR_TOKEN)
  data.reasoning_marker = True
  try:
    marked = data_setup.make_tokenizer(data)
    eor = marked.token_to_id(EOR_TOKEN)
    assert marked.encode(f"a plan {EOR_TOKEN} a cat").count(eor) == 1
    assert os.path.exists(os.path.join(data.root, data_setup.DEMO_MARKER_TOKENIZER))
    # The default tokenizer file is untouched: runs trained with it keep their ids.
    assert data_setup.make_tokenizer(data).token_to_id(EOR_TOKEN) == eor
    # A given tokenizer without the marker (a backbone's) gets it appended, as <|emb|>.
    data.tokenizer = os.path.join(data.root, data_setup.DEMO_TOKENIZER)
    given = data_setup.make_tokenizer(data)
    assert given.added_ids == [given.token_to_id(EOR_TOKEN)] == [plain.vocab_size]
  finally:
    data.reasoning_marker, data.tokenizer = False, ""
  with pytest.raises(KeyError):
    data_setup.make_tokenizer(data).token_to_id(EOR_TOKEN)


def test_marker_and_candidate_targets_in_the_examples(data):
  plain = data_setup.load_examples(data)
  data.reasoning_marker, data.cand_target = True, "answer"
  try:
    marked = data_setup.load_examples(data)
  finally:
    data.reasoning_marker, data.cand_target = False, "none"
  assert [e.qid for e in plain] == [e.qid for e in marked]
  assert any(e.is_reasoning for e in marked) and not all(e.is_reasoning for e in marked)
  for p, m in zip(plain, marked):
    assert p.cand_reasoning is None
    if not p.is_reasoning:
      assert m.reasoning is None and m.cand_reasoning is None
      continue
    reasoning, answer = m.reasoning.split(f" {EOR_TOKEN} ")
    assert f"{reasoning} {answer}" == p.reasoning
    assert m.cand_reasoning == answer  # The answer describes the positive candidate.


def test_candidate_targets_need_the_cot_file(data):
  data.cand_target, cot = "full", data.cot_file
  data.cot_file = ""
  try:
    with pytest.raises(ValueError, match="needs an M-BEIR-CoT file"):
      data_setup.load_examples(data)
  finally:
    data.cand_target, data.cot_file = "none", cot


def examples_shards_refuse(data, field: str, value) -> list:
  """The examples with `data.<field>=value`, after checking that a shards config refuses it
  (`data` is left as it was)."""
  default = data[field]
  data[field] = value
  try:
    examples = data_setup.load_examples(data)
    with pytest.raises(ValueError, match=f"fixed at conversion.*{field}"):
      data.shards_dir = "some/shards"
      data_setup.check_shards_targets(data)
  finally:
    data[field], data.shards_dir = default, ""
  return examples


def test_shards_refuse_what_they_cannot_hold(data, tmp_path):
  examples = examples_shards_refuse(data, "cand_target", "answer")
  first = next(e for e in examples if e.cand_reasoning)
  out = str(tmp_path / "ds")
  with pytest.raises(ValueError, match=first.example_id):
    shards.write_examples([first], data.root, out)
  assert not os.path.exists(out)  # Nothing half-written.


def test_hard_negatives_from_the_world_and_not_from_shards(data, tmp_path):
  """The world lists each query's one-attribute neighbours; `listed` trains on them (every
  task-6 answer has some, so no task-6 query draws from the pool); shards cannot hold them."""
  examples = examples_shards_refuse(data, "hard_negatives", "listed")
  queries = {}
  for query_file, _ in data.train_files:
    queries.update({q.qid: q for q in mbeir.load_queries(os.path.join(data.root, query_file))})
  assert all(e.neg_id is not None and e.neg_id != e.cand_id for e in examples)
  assert all(e.neg_id in queries[e.qid].neg_cand_list for e in examples if e.task_id == 6)
  out = str(tmp_path / "ds")
  with pytest.raises(ValueError, match=f"{examples[0].example_id}: shards do not hold neg_id"):
    shards.write_examples(examples[:1], data.root, out)
  assert not os.path.exists(out)


def test_lm_target_is_a_plain_chat_turn_without_candidates(data):
  """`data.target="lm"` (a backbone's pretraining): the teacher's text, or a direct query's
  candidate text, is the response; the tokenizer has no `<|emb|>`; no candidate side."""
  full = {e.qid: e for e in data_setup.load_examples(data)}
  files = data.train_files
  data.target = "lm"
  try:
    with pytest.raises(ValueError, match=r"task0_train.jsonl:1: query .* nothing to learn"):
      data_setup.load_examples(data)  # Task 0's caption -> image has no text to write.
    data.train_files = tuple(f for f in files if "task0" not in f[0])
    tok = data_setup.make_tokenizer(data)
    examples = data_setup.load_examples(data)
  finally:
    data.target, data.train_files = "full", files
  with pytest.raises(KeyError):
    tok.emb_id
  assert os.path.exists(os.path.join(data.root, data_setup.DEMO_BASE_TOKENIZER))
  assert {e.task_id for e in examples} == {3, 6, 7}
  for e in examples:
    expected = full[e.qid].reasoning if e.task_id in (6, 7) else e.cand_text
    assert e.reasoning == expected and expected
  model_cfg = data_setup.with_token_ids(
    ModelConfig.from_dict(demo.get_config().model.to_dict()), tok)
  to_arrays = ToArrays(tok, model_cfg, Shapes(80, 24, (1, 6, 6)), data.root,
                       compact_prompts=True, lm_only=True)
  rows = [to_arrays.map(e.to_dict()) for e in examples[:4]]
  assert not any(k.startswith("cand") for k in rows[0])
  batch = pad_batch(rows, Buckets((80,), (24,)))
  assert "cand_ids" not in batch and "cand_key" not in batch
  end = tok.token_to_id("<|im_end|>")
  for ids, target in zip(batch["query_ids"], batch["query_target_mask"]):
    assert ids[np.flatnonzero(target)[-1]] == end
