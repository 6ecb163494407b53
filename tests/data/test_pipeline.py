"""The Grain pipeline: static padded batches, determinism, exact resume, task mixing, process
sharding, bad examples, workers, hard negatives, and a real train step on its output."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from tests.data import pipeline_fixture as fx
from trace_jax import sharding
from trace_jax.data import mbeir, shards
from trace_jax.data.examples import TrainExample
from trace_jax.data.pipeline import (SKIP_REASONS, SKIPPED, Buckets, TooManyBadExamplesError,
                                     group_by_task, make_dataset, pad_to, to_global,
                                     widths)
from trace_jax.data.transforms import TRUNCATED
from trace_jax.data.transforms import BadExampleError, Shapes, ToArrays
from trace_jax.model import QwenVL
from trace_jax.train import state as state_lib
from trace_jax.train.step import StepConfig, make_train_step

SHAPES = Shapes(256, 160, (1, 4, 4))
BUCKETS = Buckets((192, 256), (96, 128, 160))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return fx.tokenizer(str(tmp_path_factory.mktemp("sp")))


def dataset(tok, examples=None, on_bad="error", cand_may_reason=False, shapes=SHAPES,
            buckets=BUCKETS, query_text_tokens=0, **kw):
  to_arrays = ToArrays(tok, fx.model_config(tok), shapes, fx.ROOT, on_bad_example=on_bad,
                       cand_may_reason=cand_may_reason, query_text_tokens=query_text_tokens)
  kw.setdefault("batch_size", 4)
  kw.setdefault("seed", 0)
  return make_dataset(group_by_task(examples or fx.examples()), to_arrays, buckets, **kw)


def take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_batches_are_padded_and_deterministic(tok):
  a, b = take(dataset(tok), 3), take(dataset(tok), 3)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  batch = a[0]
  assert batch["query_ids"].shape[1] in BUCKETS.query and batch["cand_ids"].shape[1] in BUCKETS.cand
  assert batch["query_pixels"].shape == (4, 16, 1176)
  lengths = batch["query_mask"].sum(1)
  for i, n in enumerate(lengths):  # The target ends each query with <|emb|>; padding after.
    assert batch["query_ids"][i, n - 1] == tok.emb_id and batch["query_target_mask"][i, n - 1]
    assert not batch["query_mask"][i, n:].any()
  other_seed = take(dataset(tok, seed=1), 1)[0]
  assert not np.array_equal(other_seed["query_ids"], batch["query_ids"])


def test_resume_from_iterator_state(tok):
  it = iter(dataset(tok))
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = next(it)
  fresh = iter(dataset(tok))
  fresh.set_state(state)
  got = next(fresh)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_task_weights_and_one_task_per_batch(tok):
  only_7 = take(dataset(tok, task_weights={0: 0.0, 3: 0.0, 6: 0.0, 7: 1.0}), 2)
  assert all((b["task_id"] == 7).all() for b in only_7)
  for b in take(dataset(tok, one_task_per_batch=True), 6):
    assert len(set(b["task_id"].tolist())) == 1
  with pytest.raises(ValueError, match="no examples"):
    dataset(tok, task_weights={5: 1.0})


def test_processes_get_disjoint_examples(tok):
  def seen(pi):  # An example is its tokens plus its images (task-3 queries share their text).
    batches = take(dataset(tok, shards=[pi], num_shards=2, batch_size=2), 6)
    return {(tuple(ids), q.tobytes(), c.tobytes()) for b in batches
            for ids, q, c in zip(b["query_ids"].tolist(), b["query_pixels"], b["cand_pixels"])}
  assert not seen(0) & seen(1)


def test_bad_examples_error_or_skip(tok):
  examples = fx.examples(8)
  examples[1] = dataclasses.replace(examples[1], query_image="mbeir_images/none.jpg")
  examples[2] = dataclasses.replace(examples[2], cand_text="  ", cand_image=None)
  examples[3] = dataclasses.replace(examples[3], reasoning="long " * 400)  # No room, even cut.
  with pytest.raises(BadExampleError, match=r"fixture:\d \(query 10:\d\)"):
    take(dataset(tok, examples, task_weights=None), 4)
  batches = take(dataset(tok, examples, on_bad="skip", batch_size=2, max_skip_fraction=0.9,
                         skip_window=8), 8)
  reasons = [r for b in batches for r in b[SKIP_REASONS]]
  assert sum(int(b[SKIPPED]) for b in batches) == len(reasons) > 0
  for i, what in ((1, "image not found"), (2, "empty text and no image"),
                  (3, "without any of its text")):
    named = [r for r in reasons if r.startswith(f"fixture:{i} (query 10:{i}): ")]
    assert named and all(what in r for r in named), (i, reasons)


def test_too_many_bad_examples_stop_with_their_reasons(tok):
  """A source of bad examples only would loop forever: it stops, naming the last reasons."""
  examples = [dataclasses.replace(e, query_image="mbeir_images/none.jpg", cand_image=None)
              for e in fx.examples(8) if e.query_image]
  with pytest.raises(TooManyBadExamplesError, match=r"fixture:\d+ \(query 10:\d+\): .*not found"):
    take(dataset(tok, examples, on_bad="skip", batch_size=2, skip_window=50), 1)
  # Two bad in eight (25%) passes a limit of 30% and fails one of 20%.
  mixed = fx.examples(8)
  for i in (1, 5):
    mixed[i] = dataclasses.replace(mixed[i], query_image="mbeir_images/none.jpg")
  take(dataset(tok, mixed, on_bad="skip", batch_size=2, max_skip_fraction=0.3, skip_window=8), 8)
  with pytest.raises(TooManyBadExamplesError, match="max_skip_fraction=0.2"):
    take(dataset(tok, mixed, on_bad="skip", batch_size=2, max_skip_fraction=0.2, skip_window=8),
         8)


def test_long_texts_are_cut_and_named(tok):
  examples = fx.examples(8)
  examples[3] = dataclasses.replace(examples[3], query_text="Find the target. " + "long " * 400)
  examples[6] = dataclasses.replace(examples[6], cand_text="word " * 400)
  batches = take(dataset(tok, examples, batch_size=8, query_text_tokens=40), 1)
  notes = batches[0][TRUNCATED]
  assert len(notes) == 2, notes
  cut = len(tok.encode(examples[3].query_text)) - 40  # data.query_text_tokens.
  assert f"fixture:3 (query 10:3): query text cut by {cut} tokens" in notes
  assert any(n.startswith("fixture:6 (query 10:6): cand text cut by") for n in notes)  # To fit.
  assert batches[0]["cand_mask"].sum(1).max() <= SHAPES.max_cand_len


def test_arrayrecord_shards_give_the_same_batches(tok, tmp_path):
  examples = fx.examples()
  shards.write_examples(examples, fx.ROOT, str(tmp_path / "shards"), num_shards=3)
  by_task = shards.split_by_task(shards.ExampleSource(str(tmp_path / "shards")))
  to_arrays = ToArrays(tok, fx.model_config(tok), SHAPES, "/nonexistent")  # Images are inline.
  got = take(make_dataset(by_task, to_arrays, BUCKETS, batch_size=4, seed=0), 2)
  for x, y in zip(got, take(dataset(tok, examples), 2)):
    for k in y:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_worker_processes_give_the_same_batches(tok):
  want = take(dataset(tok), 2)
  got = take(dataset(tok, workers=1), 2)
  for x, y in zip(got, want):
    for k in y:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def two_steps(tok, mesh, host):
  """Metrics of two train steps on one pipeline batch."""
  cfg = fx.model_config(tok)
  with jax.set_mesh(mesh):
    model = sharding.create_sharded(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)), mesh)
    optim = ConfigDict(dict(lr=1e-3, warmup_steps=0, final_lr_fraction=0.0, weight_decay=0.0,
                            b1=0.9, b2=0.99, eps=1e-8, grad_clip=1.0))
    tx, schedule = state_lib.make_optimizer(optim, 10)
    graphdef, st = state_lib.init_state(model, tx, lora_rank=0, temperature=0.05,
                                        learn_temperature=False, mesh=mesh)
    batch = to_global(host, mesh, cfg, SHAPES.image_grid)
    step = make_train_step(graphdef, StepConfig(emb_token_id=tok.emb_id, vocab_chunk=128,
                                                max_target_tokens=32),
                           tx, schedule, mesh, state_lib.shardings_of(st))
    st, m1 = step(st, batch)
    st, m2 = step(st, batch)
  return jax.device_get((m1, m2))


def test_train_step_on_pipeline_batches(tok, mesh):
  host = take(dataset(tok, batch_size=8), 1)[0]
  assert "cand_target_mask" not in host  # Candidates learn no text in the paper's setting.
  m1, m2 = two_steps(tok, mesh, host)
  assert np.isfinite(m1["loss/total"]) and m2["loss/total"] < m1["loss/total"]
  assert m1["lm/target_tokens"] == host["query_target_mask"].sum()
  assert m1["route/reason_frac"] == host["query_is_reasoning"].mean()


def test_text_only_sides_carry_no_pixels(tok, mesh):
  """No vision tower over blank images: a side without images has no pixels (per batch with one
  task per batch, per mixture otherwise), and the step on it equals the step over blank pixels."""
  examples = fx.examples(24)
  by_task = lambda b: int(b["task_id"][0])  # noqa: E731
  for b in take(dataset(tok, examples, one_task_per_batch=True), 8):
    assert ("query_pixels" in b) == (by_task(b) != 0)  # Task 0 queries are text.
    assert ("cand_pixels" in b) == (by_task(b) in (0, 7))  # Tasks 3 and 6: text candidates.
  mixed = take(dataset(tok, examples), 1)[0]
  assert "query_pixels" in mixed and "cand_pixels" in mixed
  task3 = [e for e in examples if e.task_id == 3]
  host = take(dataset(tok, task3, batch_size=8), 1)[0]
  assert "query_pixels" in host and "cand_pixels" not in host
  blank = dict(host, cand_pixels=np.zeros_like(host["query_pixels"]))
  for a, b in zip(two_steps(tok, mesh, host), two_steps(tok, mesh, blank)):
    for key in ("loss/total", "loss/contrastive", "optim/grad_norm"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=key)


def test_candidate_side_reasoning_targets_join_the_lm_loss(tok, mesh):
  """data.cand_target: the candidate of a reasoning query writes its text, then <|emb|>."""
  examples = [dataclasses.replace(e, cand_reasoning=e.reasoning) for e in fx.examples()]
  # The reasoning candidate rule is not in the fixture tokenizer's corpus: bytes, a longer bucket.
  host = take(dataset(tok, examples, cand_may_reason=True, batch_size=8,
                      shapes=Shapes(256, 256, SHAPES.image_grid),
                      buckets=Buckets(BUCKETS.query, (256,))), 1)[0]
  lengths, targets = host["cand_mask"].sum(1), host["cand_target_mask"].sum(1)
  for i, n in enumerate(lengths):
    assert host["cand_ids"][i, n - 1] == tok.emb_id and host["cand_target_mask"][i, n - 1]
    assert (targets[i] > 1) == bool(host["query_is_reasoning"][i])  # Direct: <|emb|> alone.
  m1, m2 = two_steps(tok, mesh, host)
  assert np.isfinite(m1["loss/total"]) and m2["loss/total"] < m1["loss/total"]
  assert m1["lm/target_tokens"] == host["query_target_mask"].sum() + targets.sum()


def test_global_batches_do_not_depend_on_the_process_count(tok):
  """Two processes owning one shard each see the halves of what one process owning both sees."""
  whole = take(dataset(tok, shards=[0, 1], num_shards=2, batch_size=8), 2)
  halves = [take(dataset(tok, shards=[s], num_shards=2, batch_size=4), 2) for s in (0, 1)]
  for i, batch in enumerate(whole):
    for key in ("query_ids", "cand_ids", "query_pixels", "task_id"):
      parts = [h[i][key] for h in halves]
      width = batch[key].shape[-1] if key.endswith("ids") else None
      if width:  # Each half may pad to a shorter bucket.
        parts = [np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in parts]
      np.testing.assert_array_equal(batch[key], np.concatenate(parts), err_msg=key)


def with_negatives(examples):
  """Each example's hard negative: the next example's candidate of the same task."""
  by_task = group_by_task(examples)
  out = []
  for e in examples:
    same = [TrainExample.from_dict(r) for r in by_task[e.task_id]]
    other = same[(next(i for i, x in enumerate(same) if x.example_id == e.example_id) + 1) %
                 len(same)]
    out.append(dataclasses.replace(e, neg_id=other.cand_id, neg_text=other.cand_text,
                                   neg_image=other.cand_image))
  return out


def test_hard_negatives_are_a_third_side_encoded_as_candidates(tok, mesh):
  examples = with_negatives(fx.examples(24))
  host = take(dataset(tok, examples, batch_size=8), 1)[0]
  assert "neg_target_mask" not in host  # Negatives learn no text.
  assert host["neg_ids"].shape[1] in BUCKETS.cand and "neg_pixels" in host
  # A negative is encoded exactly as that candidate is on the cand side.
  to_arrays = ToArrays(tok, fx.model_config(tok), SHAPES, fx.ROOT)
  for i in range(8):
    n = host["neg_mask"][i].sum()
    ex = next(e for e in examples if mbeir.did_key(e.neg_id) == host["neg_key"][i])
    as_cand = to_arrays.map(dataclasses.replace(ex, cand_id=ex.neg_id, cand_text=ex.neg_text,
                                                cand_image=ex.neg_image).to_dict())
    np.testing.assert_array_equal(host["neg_ids"][i, :n], as_cand["cand_ids"])
    np.testing.assert_array_equal(host["neg_positions"][:, i, :n], as_cand["cand_positions"])
    if ex.neg_image:
      np.testing.assert_array_equal(host["neg_pixels"][i], as_cand["cand_pixels"])
  # The step ranks the positive against the negatives too: at the same weights, the InfoNCE
  # over more columns is larger (its log-sum-exp only gains terms).
  with_neg, _ = two_steps(tok, mesh, host)
  without, _ = two_steps(tok, mesh, {k: v for k, v in host.items() if not k.startswith("neg_")})
  assert with_neg["loss/contrastive"] > without["loss/contrastive"] + 0.05
  assert with_neg["loss/lm"] == pytest.approx(without["loss/lm"], rel=1e-5)


def test_bad_hard_negatives_are_bad_examples(tok):
  examples = with_negatives(fx.examples(8))
  examples[0] = dataclasses.replace(examples[0], neg_image="mbeir_images/none.jpg")
  examples[2] = dataclasses.replace(examples[2], neg_text=" ", neg_image=None)
  batches = take(dataset(tok, examples, on_bad="skip", batch_size=2, max_skip_fraction=0.9,
                         skip_window=8), 8)
  reasons = [r for b in batches for r in b[SKIP_REASONS]]
  for i, what in ((0, "image not found"), (2, f"hard negative {examples[2].neg_id} has empty")):
    named = [r for r in reasons if r.startswith(f"fixture:{i} (query 10:{i}): ")]
    assert named and all(what in r for r in named), (i, reasons)


def test_processes_agree_on_one_bucket(tok):
  """Each process pads its rows to its own batch's bucket; `to_global` pads them to the widest
  any process picked (one process: its own), as `pad_batch` pads."""
  host = take(dataset(tok, batch_size=4), 1)[0]
  own = widths(host)
  assert own == {"query": host["query_ids"].shape[1], "cand": host["cand_ids"].shape[1]}
  wider = pad_to(host, {"query": own["query"] + 5, "cand": own["cand"]})
  assert wider["query_ids"].shape == (4, own["query"] + 5)
  assert wider["query_positions"].shape == (3, 4, own["query"] + 5)
  for key in ("query_ids", "query_mask", "query_target_mask", "query_positions"):
    np.testing.assert_array_equal(wider[key][..., :own["query"]], host[key], err_msg=key)
    assert not wider[key][..., own["query"]:].any(), key
  for key in ("cand_ids", "query_pixels", "cand_key"):
    assert wider[key] is host[key], key
