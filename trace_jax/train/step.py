"""The TRACE train step: LM loss on the query target plus cross-device InfoNCE, one jitted step.

`make_train_step` returns a pure `train_step(state, batch) -> (state, metrics)` jitted with pinned
shardings and a donated state. With `micro_batches > 1` it runs GradCache: every micro-batch is
embedded without gradients, the contrastive loss is differentiated with respect to the embeddings
of the whole global batch, then each micro-batch's backward pass runs with that cached gradient
plus its own LM gradient; so accumulation never shrinks the pool of negatives.

Loss normalisation (TRACE.md, "Training"): `L_gen` is the sum of token cross-entropies over every
target token of the global batch (reasoning tokens and `<|emb|>`; the candidates' too under
the candidate-side reasoning ablation) divided by the number of those tokens; `L_ret` is the
mean over the global batch of the query->candidate InfoNCE term.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from trace_jax import sharding
from trace_jax.data.batch import SIDES, batch_shardings, field_of, side_of
from trace_jax.model.readout import READOUTS, normalize, readout_index
from trace_jax.train import losses
from trace_jax.train.state import TrainState

IMPLS = ("global", "shard_map", "chunked")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  lambda_gen: float = 1.0
  lambda_ret: float = 1.0
  temperature: float = 0.02
  learn_temperature: bool = False
  symmetric: bool = False
  contrastive_impl: str = "chunked"
  contrastive_chunk: int = 256
  vocab_chunk: int = 8192
  max_target_tokens: int = 256
  readout: str = "pre_token"
  emb_token_id: int = 151665
  eor_token_id: int = -1
  micro_batches: int = 1
  seed: int = 0

  def __post_init__(self):
    if self.readout not in READOUTS:
      raise ValueError(f"loss.readout={self.readout!r}; expected one of {READOUTS}")
    if self.contrastive_impl not in IMPLS:
      raise ValueError(f"loss.contrastive_impl={self.contrastive_impl!r}; expected one of {IMPLS}")

  @classmethod
  def from_config(cls, config) -> "StepConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in config.loss.to_dict().items() if k in names}
    return cls(**kw, micro_batches=config.optim.micro_batches, seed=config.seed)


def target_slots(ids_bt, target_mask_bt, m: int):
  """The last `m` target tokens of each row: (predicting positions, target ids, weights) [B, m],
  and how many targets did not fit.

  The tail is kept: a target longer than `m` loses the start of its reasoning, never its answer
  and `<|emb|>`, the tokens that teach the model what to embed and when to stop. (The forward
  pass still reads the whole sequence; only the loss skips the head.)
  """
  is_target = target_mask_bt[:, 1:] > 0  # Token t+1 is a target, predicted at position t.
  from_end = jnp.cumsum(is_target[:, ::-1], axis=1)[:, ::-1]  # Targets at or after t.
  keep = is_target & (from_end <= m)
  order = jnp.argsort(~keep, axis=1, stable=True)[:, :m]
  weights = jnp.take_along_axis(keep, order, axis=1)
  targets = jnp.take_along_axis(ids_bt[:, 1:], order, axis=1)
  dropped = jnp.sum(is_target) - jnp.sum(weights)
  return order, targets, weights, dropped


def make_train_step(graphdef, cfg: StepConfig, tx: optax.GradientTransformation, schedule,
                    mesh, state_shardings: TrainState) -> "StepFunction":
  """The jitted `train_step(state, batch) -> (state, metrics)` (one program per batch layout)."""

  def contrastive(q, c, n, scale, keys):
    kw = dict(neg_bd=n, symmetric=cfg.symmetric, cand_keys=keys.get("cand_key"),
              neg_keys=keys.get("neg_key"))
    if cfg.contrastive_impl == "global":
      return losses.infonce_global(q, c, scale, **kw)
    if cfg.contrastive_impl == "shard_map":
      return losses.infonce_shard_map(q, c, scale, mesh=mesh, **kw)
    return losses.infonce_chunked(q, c, scale, mesh=mesh, chunk=cfg.contrastive_chunk, **kw)

  def scale_of(params):
    return jnp.exp(params["log_scale"]) if "log_scale" in params else 1.0 / cfg.temperature

  def forward(params, frozen, batch, rng):
    """Per (micro-)batch: L2-normalised embeddings and the summed LM loss."""
    model = nnx.merge(graphdef, params["model"], frozen)
    keys = jax.random.split(rng, 3)
    out = {}
    for i, side in enumerate(s for s in SIDES if f"{s}_ids" in batch):
      b = side_of(batch, side)
      h = model(b["ids"], b["mask"], b.get("pixels"), position_ids=b["positions"],
                vision_layout=b.get("layout"), return_logits=False,
                dropout_rng=keys[i]).hidden_states
      idx = readout_index(b["ids"], cfg.readout, cfg.emb_token_id, cfg.eor_token_id)
      emb = jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]
      out[side] = normalize(sharding.constrain(emb, ("act_batch", "act_embed")))
      if "target_mask" in b:  # Queries; candidates too under candidate-side reasoning.
        pos, tgt, w, dropped = target_slots(b["ids"], b["target_mask"], cfg.max_target_tokens)
        h_sel = sharding.constrain(jnp.take_along_axis(h, pos[..., None], axis=1),
                                   ("act_batch", None, "act_embed"))
        lm_sum, lm_count = losses.lm_loss(h_sel.reshape(-1, h.shape[-1]), model.unembedding(),
                                          tgt.reshape(-1), w.reshape(-1), cfg.vocab_chunk)
        for key, value in (("lm_sum", lm_sum), ("lm_count", lm_count), ("dropped", dropped)):
          out[key] = out[key] + value if key in out else value
    return out

  def ret_loss(q, c, n, params, keys):
    return contrastive(q, c, n, scale_of(params), keys)

  def one_shot(params, frozen, batch, rng):
    def total(params):
      out = forward(params, frozen, batch, rng)
      lm = out["lm_sum"] / jnp.maximum(out["lm_count"], 1.0)
      if "cand" in out:
        ret, stats = ret_loss(out["query"], out["cand"], out.get("neg"), params, _keys(batch))
      else:  # No candidates: a backbone's LM-only pretraining (data.target="lm").
        ret, stats = jnp.float32(0), losses.ContrastiveStats(*(jnp.float32(0),) * 3)
      return cfg.lambda_gen * lm + cfg.lambda_ret * ret, (lm, ret, stats, out)
    (loss, aux), grads = jax.value_and_grad(total, has_aux=True)(params)
    return loss, aux, grads

  def grad_cache(params, frozen, batch, rng):
    k = cfg.micro_batches
    micro = jax.tree.map(lambda x: x, split_micro(batch, k))
    keys = jax.random.split(rng, k)
    _, outs = jax.lax.scan(
      lambda c, xs: (c, jax.lax.stop_gradient(forward(params, frozen, xs[0], xs[1]))),
      None, (micro, keys))
    merge = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    q, c = merge(outs["query"]), merge(outs["cand"])
    n = merge(outs["neg"]) if "neg" in outs else None
    lm_count = jnp.maximum(jnp.sum(outs["lm_count"]), 1.0)
    lm = jnp.sum(outs["lm_sum"]) / lm_count
    cand_ids = {name: v.reshape(-1) for name, v in _keys(micro).items()}  # Embeddings order.
    (ret, stats), (dq, dc, dn, dparams) = jax.value_and_grad(
      ret_loss, argnums=(0, 1, 2, 3), has_aux=True)(q, c, n, params, cand_ids)
    split = lambda g: None if g is None else g.reshape(k, -1, g.shape[-1])  # noqa: E731
    cot = {"query": split(dq), "cand": split(dc), "neg": split(dn)}

    def backward(acc, xs):
      mb, key, cq, cc, cn = xs

      def f(p):
        o = forward(p, frozen, mb, key)
        return {s: o[s] for s in SIDES if s in o}, o["lm_sum"]
      _, vjp = jax.vjp(f, params)
      g = vjp(({s: cfg.lambda_ret * v for s, v in zip(SIDES, (cq, cc, cn)) if v is not None},
               cfg.lambda_gen / lm_count))[0]
      return jax.tree.map(jnp.add, acc, g), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(backward, zeros,
                            (micro, keys, cot["query"], cot["cand"], cot["neg"]))
    grads = jax.tree.map(lambda g, d: g + cfg.lambda_ret * d, grads, dparams)
    out = {"lm_count": lm_count, "dropped": jnp.sum(outs["dropped"])}
    return cfg.lambda_gen * lm + cfg.lambda_ret * ret, (lm, ret, stats, out), grads

  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
    run = one_shot if cfg.micro_batches == 1 else grad_cache
    loss, (lm, ret, stats, out), grads = run(state.params, state.frozen, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      "loss/total": loss, "loss/lm": lm, "loss/contrastive": ret,
      "contrastive/top1": stats.top1, "contrastive/pos_logit": stats.pos_logit,
      "contrastive/neg_logit": stats.neg_logit,
      "contrastive/temperature": 1.0 / scale_of(state.params),
      "optim/grad_norm": optax.global_norm(grads), "optim/lr": schedule(state.step),
      "route/reason_frac": jnp.mean(batch["query_is_reasoning"].astype(jnp.float32))
      if "query_is_reasoning" in batch else jnp.float32(0),
      "lm/target_tokens": out["lm_count"], "lm/dropped_targets": out["dropped"],
    }
    return TrainState(state.step + 1, params, state.frozen, opt_state), metrics

  return StepFunction(train_step, mesh, state_shardings)


class StepFunction:
  """`train_step` jitted once per batch layout (which sides carry pixels, hard negatives, ...),
  each with the batch's shardings pinned and the state donated. A batch without a side's pixels
  runs no vision tower for it: a text-only side costs no blank-image forward."""

  def __init__(self, fn, mesh, state_shardings):
    self.fn, self.mesh, self.state_shardings = fn, mesh, state_shardings
    self._jitted: dict[tuple[str, ...], Any] = {}

  def _for(self, batch: dict):
    key = tuple(sorted(batch))
    if key not in self._jitted:
      self._jitted[key] = jax.jit(
        self.fn, in_shardings=(self.state_shardings, batch_shardings(batch, self.mesh)),
        out_shardings=(self.state_shardings, sharding.replicated(self.mesh)), donate_argnums=0)
    return self._jitted[key]

  def __call__(self, state: TrainState, batch: dict):
    return self._for(batch)(state, batch)

  def lower(self, state, batch: dict):
    """The step lowered for these (abstract) arguments: ahead-of-time compilation."""
    return self._for(batch).lower(state, batch)


def _keys(batch: dict) -> dict:
  """The candidates' ids (`cand_key`, `neg_key`) when the batch has them (in-batch duplicates
  are then masked out of the negatives)."""
  return {k: batch[k] for k in ("cand_key", "neg_key") if k in batch}


def split_micro(batch: dict, k: int) -> dict:
  """[B, ...] -> [k, B/k, ...] (positions: [3, B, T] -> [k, 3, B/k, T]); micro-batch j takes
  rows j, j+k, j+2k, ... so that each stays spread over every device. Layouts are shared."""
  def one(key, x):
    field = field_of(key)
    if field == "layout":
      return jax.tree.map(lambda a: jnp.broadcast_to(a, (k, *a.shape)), x)
    axis = 1 if field == "positions" else 0
    b = x.shape[axis]
    if b % k:
      raise ValueError(f"batch of {b} does not split into {k} micro-batches ({key})")
    x = x.reshape(*x.shape[:axis], b // k, k, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis + 1, 0)
  return {key: one(key, v) for key, v in batch.items()}
