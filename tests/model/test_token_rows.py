"""Trainable rows for added tokens over a frozen vocabulary: why they are needed (a frozen mean
row is never the likeliest token), and that they start at the model, train alone, and merge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.model import tiny
from trace_jax.model import token_rows
from trace_jax.model.vocab import add_token_rows
from trace_jax.train.state import is_trainable

EMB = 94  # An unused id of the tiny vocabulary (96 rows), taken as the added `<|emb|>`.


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def model(request):
  m = tiny.model(tiny.config(tie_embeddings=request.param))
  return add_token_rows(m, [EMB], 80)


def test_a_frozen_mean_row_is_never_the_likeliest_token(model):
  """h . mean(rows) is the mean of the other logits: without trainable rows, LoRA can never make
  the model write `<|emb|>` first (the demo's fine-tune did not, on any query)."""
  logits = np.asarray(model(**tiny.batch()).logits)[..., :80]
  mean_logit = np.asarray(model(**tiny.batch()).logits)[..., EMB]
  np.testing.assert_allclose(mean_logit, logits.mean(-1), rtol=1e-4, atol=1e-4)
  assert (mean_logit < logits.max(-1)).all()


def test_rows_start_at_the_model_train_alone_and_merge(model):
  batch = tiny.batch()  # Left-padded: each row's last token is EMB, as a query's target ends.
  batch["input_ids"][:, -1] = EMB
  before = np.asarray(model(**batch).logits)
  token_rows.attach(model, [EMB])
  np.testing.assert_array_equal(np.asarray(model(**batch).logits), before)

  keep = is_trainable(lora_rank=4)
  trainable = [p for p, v in nnx.to_flat_state(nnx.state(model))
               if keep(p, v) and p[0] != "visual"]  # (and the merger, as always)
  assert sorted("/".join(map(str, p)) for p in trainable) == sorted(
    ["token_rows/embed"] + ([] if model.lm_head is None else ["token_rows/head"]))

  graphdef, rows, rest = nnx.split(model, lambda p, v: p[0] == "token_rows", ...)

  def emb_logit(rows):
    return nnx.merge(graphdef, rows, rest)(**batch).logits[..., EMB].sum()
  grads = jax.grad(emb_logit)(rows)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))

  model.token_rows.embed.set_value(model.token_rows.embed[...] + 0.3)
  if model.lm_head is not None:
    model.token_rows.head.set_value(model.token_rows.head[...] + 0.3)
  moved = np.asarray(model(**batch).logits)
  assert np.abs(moved[..., EMB] - before[..., EMB]).max() > 1e-2
  # Before the last position (EMB's input row) only EMB's own logit can move (padding aside).
  real = batch["attention_mask"][:, :-1] > 0
  np.testing.assert_allclose(moved[:, :-1, :EMB][real], before[:, :-1, :EMB][real], atol=1e-6)
  token_rows.merge(model)
  assert model.token_rows is None
  np.testing.assert_allclose(np.asarray(model(**batch).logits), moved, atol=1e-5)
