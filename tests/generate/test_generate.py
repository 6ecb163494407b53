"""The generation engine: greedy output token-identical to transformers' `generate`, scores
equal to transformers' log-probabilities, sampled outputs independent of batch and slot, draws
from exactly the filtered distribution, continuous batching equal to one-by-one generation."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from tests.model import reference, tiny
from tests.model.reference import Case
from trace_jax import sharding
from trace_jax.generate import Engine, Request, Sampling, generate, programs, score
from trace_jax.generate.sampling import filtered_logits, next_tokens
from trace_jax.model.hf_io import load_hf

CASES = [
  Case("v25_left", "qwen2_5_vl", kv_heads=2, tie=False, grids=((1, 6, 12),), padding="left"),
  Case("v2_left", "qwen2_vl", kv_heads=1, tie=True, grids=((1, 4, 8),), padding="left"),
  Case("v25_text_left", "qwen2_5_vl", kv_heads=4, tie=True, grids=(), images_per_row=0,
       padding="left"),
]


def hf_generate(model, batch, max_new, stop):
  kw = {k: torch.tensor(v) for k, v in batch.items()}
  kw["mm_token_type_ids"] = (kw["input_ids"] == reference.IMAGE).long()
  with torch.no_grad():
    out = model.generate(**kw, max_new_tokens=max_new, do_sample=False, eos_token_id=stop,
                         pad_token_id=0)
  new = out[:, batch["input_ids"].shape[1]:].numpy()
  rows = []
  for row in new:
    row = list(row)
    rows.append(row[:row.index(stop) + 1] if stop in row else row)
  return rows


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_greedy_equals_transformers(case, tmp_path):
  ref = reference.hf_model(case)
  ref.save_pretrained(tmp_path)
  model, _ = load_hf(str(tmp_path), dtype="float32")
  batch = reference.inputs(case, batch=3)
  free = generate(model, **batch, max_new_tokens=12)  # No stop: pick one that ends a row early.
  stop = free[1][4]
  want = hf_generate(ref, batch, 12, stop)
  got = generate(model, **batch, max_new_tokens=12, stop_ids=(stop,), chunk=5)
  assert got == want
  assert any(len(r) < 12 for r in got) and any(len(r) == 12 for r in got)


def test_score_equals_transformers_logprobs(tmp_path):
  case = CASES[0]
  ref = reference.hf_model(case)
  ref.save_pretrained(tmp_path)
  model, _ = load_hf(str(tmp_path), dtype="float32")
  batch = reference.inputs(dataclasses.replace(case, padding="right"), batch=2)
  cont = np.zeros_like(batch["attention_mask"])
  lengths = batch["attention_mask"].sum(1)
  for r, n in enumerate(lengths):
    cont[r, n - 3 - r:n] = 1  # The last 3 and 4 tokens are the continuation.
  logits, _ = reference.hf_forward(ref, batch)
  logp = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1).numpy()
  want = [sum(logp[r, p - 1, batch["input_ids"][r, p]] for p in np.flatnonzero(cont[r]))
          for r in range(2)]
  got = score(model, batch["input_ids"], batch["attention_mask"], cont,
              pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def np_filtered(logits, temperature, top_k, top_p):
  """The exactly filtered distribution, numpy float64."""
  z = logits.astype(np.float64) / temperature
  if top_k:
    z = np.where(z >= np.sort(z)[::-1][top_k - 1], z, -np.inf)
  p = np.exp(z - z.max())
  p /= p.sum()
  if top_p < 1:
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    keep = np.zeros_like(p, bool)
    keep[order[before < top_p]] = True
    p = np.where(keep, p, 0.0)
    p /= p.sum()
  return p


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0),
                                                     (1.3, 0, 0.8), (1.0, 4, 0.6)])
def test_draws_follow_the_filtered_distribution(temperature, top_k, top_p):
  """20,000 draws over a 6-token vocabulary against the exact distribution: every kept token's
  frequency within 5 standard errors, every filtered one never drawn."""
  logits = np.log(np.asarray([0.30, 0.25, 0.18, 0.12, 0.10, 0.05]))
  want = np_filtered(logits, temperature, top_k, top_p)
  s = Sampling(temperature, top_k, top_p)
  np.testing.assert_allclose(jax.nn.softmax(filtered_logits(logits[None], s))[0], want,
                             atol=1e-6)
  n = 20000
  seeds = np.arange(n, dtype=np.int32)
  draws = np.asarray(next_tokens(np.tile(logits, (n, 1)), s, seeds, np.zeros(n, np.int32)))
  freq = np.bincount(draws, minlength=6) / n
  assert (freq[want == 0] == 0).all()
  se = np.sqrt(want * (1 - want) / n)
  assert (np.abs(freq - want) <= 5 * se + 1e-9).all(), (freq, want)


def requests(n, seed=0):
  rng = np.random.default_rng(seed)
  return [Request(list(rng.integers(0, 80, 3 + i % 4)), None, seed=100 + i, tag=i)
          for i in range(n)]


def one_by_one(model, reqs, **kw):
  out = {}
  for r in reqs:
    engine = Engine(model, capacity=1, **kw)
    out.update({f.tag: f.tokens for f in engine.run([r], buckets=(16,), batch_size=1)})
  return out


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(1.0, 20, 0.9)])
def test_continuous_batching_equals_one_by_one(sampling):
  """Nine requests through 3 slots (slots refilled as rows finish, in any order) give each
  request the output it gets alone: greedy, and sampled with its own seed."""
  model = tiny.model()
  kw = dict(cache_len=16 + 10, max_new_tokens=10, sampling=sampling, chunk=3)
  reqs = requests(9)
  free = one_by_one(model, reqs, **kw)  # A stop id that ends some rows early.
  counts = np.bincount([t for tokens in free.values() for t in tokens[1:6]])
  kw["stop_ids"] = (int(counts.argmax()),)
  alone = one_by_one(model, reqs, **kw)
  engine = Engine(model, capacity=3, **kw)
  together = {f.tag: f.tokens for f in engine.run(reqs[::-1], buckets=(16,), batch_size=2)}
  assert together == alone
  lengths = {len(t) for t in alone.values()}
  assert len(lengths) > 1  # Mixed output lengths: slots were refilled at different times.


def test_stop_strings_cut_the_output():
  model = tiny.model()
  reqs = requests(4)
  decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
  engine = Engine(model, capacity=4, cache_len=30, max_new_tokens=12, chunk=4)
  free = {f.tag: f.tokens for f in engine.run(reqs, buckets=(16,))}
  target = free[0][5]
  stop_string = f" {target}"
  engine = Engine(model, capacity=4, cache_len=30, max_new_tokens=12, chunk=4)
  cut = {f.tag: f.tokens for f in engine.run(reqs, buckets=(16,), stop_strings=(stop_string,),
                                             decode=decode)}
  for tag, tokens in free.items():
    text = decode(tokens)
    if stop_string in text:
      assert stop_string in decode(cut[tag]) and stop_string not in decode(cut[tag][:-1])
      assert tokens[:len(cut[tag])] == cut[tag]
    else:
      assert cut[tag] == tokens
  assert len(cut[0]) <= 6


def test_shared_prefix_gives_the_same_outputs():
  """Requests that start with one text prefix (a task's template), images after it: prefilled
  against the prefix's cache, computed once, they generate what they generate whole."""
  model = tiny.model()
  rng = np.random.default_rng(3)
  prefix = list(rng.integers(0, 80, 9))
  grid = (1, 4, 8)
  image = [tiny.START] + [tiny.IMAGE] * 8 + [tiny.END]
  reqs = [Request(prefix + (image if i % 2 else []) + list(rng.integers(0, 80, 2 + i)),
                  rng.standard_normal((32, 1176)).astype(np.float32) if i % 2 else None,
                  tag=i) for i in range(6)]
  kw = dict(capacity=4, cache_len=64, max_new_tokens=6, chunk=3)
  whole = {f.tag: f.tokens for f in Engine(model, **kw).run(reqs, grid=grid, buckets=(32,))}
  shared = {f.tag: f.tokens for f in Engine(model, **kw).run(reqs, grid=grid, buckets=(24,),
                                                             prefix=prefix)}
  assert shared == whole
  with pytest.raises(ValueError, match="does not extend the shared prefix"):
    list(Engine(model, **kw).run(reqs, grid=grid, prefix=[1] + prefix))


def test_per_request_limits():
  """A request's own `max_new_tokens` stops it there (capped), with the tokens it would write
  under the engine's larger limit."""
  model = tiny.model()
  reqs = requests(4)
  kw = dict(capacity=2, cache_len=30, max_new_tokens=9, chunk=4)
  full = {f.tag: f.tokens for f in Engine(model, **kw).run(reqs, buckets=(16,))}
  limited = [Request(r.ids, r.pixels, r.seed, r.tag, max_new_tokens=2 + r.tag) for r in reqs]
  got = {f.tag: f for f in Engine(model, **kw).run(limited, buckets=(16,))}
  for tag, f in got.items():
    assert f.tokens == full[tag][:2 + tag] and f.capped
  with pytest.raises(ValueError, match="asks for 10 new tokens"):
    list(Engine(model, **kw).run([Request(reqs[0].ids, max_new_tokens=10)], buckets=(16,)))


def test_release_frees_the_buffer_only_when_idle():
  """`release` drops a finished engine's buffer (the next run starts afresh, same outputs); with
  rows still decoding it refuses."""
  model = tiny.model()
  reqs = requests(3)
  engine = Engine(model, capacity=2, cache_len=30, max_new_tokens=6, chunk=2)
  first = {f.tag: f.tokens for f in engine.run(reqs, buckets=(16,))}
  engine.release()
  assert {f.tag: f.tokens for f in engine.run(reqs, buckets=(16,))} == first
  short, long = (dataclasses.replace(r, max_new_tokens=n) for r, n in zip(reqs, (2, 6)))
  running = engine.run([short, long], buckets=(16,))
  assert next(running).tag == short.tag and engine.active == 1
  with pytest.raises(ValueError, match="1 rows are still decoding"):
    engine.release()


@pytest.mark.parametrize("on_mesh", [False, True])
def test_decode_writes_the_cache_in_place(on_mesh):
  """A decode chunk's per-row cache writes: on one device no copy of the cache (a scatter
  mapped over rows moved the rows' axis and copied the cache every step), on a data-parallel
  mesh no all-gather of the cache (each device writes its own rows). Either way the outputs
  equal one-by-one generation's (the other tests)."""
  model = tiny.model()
  graphdef, state = nnx.split(model)
  buf = programs.empty_slots(model.cfg, 8, 32)
  args = (np.asarray([0], np.int32), np.int32(9))
  kw = dict(sampling=Sampling(), steps=2)
  if on_mesh:
    mesh = sharding.make_mesh(data=8, fsdp=1)
    buf = jax.device_put(buf, programs.slots_shardings(buf, mesh))
    with jax.set_mesh(mesh):
      hlo = programs.decode_chunk.lower(graphdef, state, buf, *args, **kw).compile().as_text()
    assert "all-gather" not in hlo
  else:
    hlo = programs.decode_chunk.lower(graphdef, state, buf, *args, **kw).compile().as_text()
    cache = "f32[" + ",".join(map(str, buf.cache.k_lbksh.shape)) + "]"
    assert not [line for line in hlo.splitlines() if cache in line and " copy(" in line]
