"""The train state pytree, what is trainable, and the optimizer.

Trainable: the patch merger, and the LLM through LoRA adapters and the rows of the tokens the
tokenizer added (`model.token_rows`), or every LLM weight when `lora.rank == 0`; plus the
InfoNCE temperature when it is learned; the vision tower only with `optim.train_vision`
(training from scratch, as the demo's backbone does). The vision tower and, under
LoRA, the base LLM weights are frozen: they live in `TrainState.frozen` and get no gradient buffer
and no optimizer state. The step itself is in `step.py`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from trace_jax import sharding
from trace_jax.model.qwen_vl import QwenVL

MERGER = ("merger_norm", "merger_fc1", "merger_fc2")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array
  params: dict[str, Any]  # {"model": trainable nnx.State, "log_scale": [] (learned temperature)}.
  frozen: Any  # nnx.State of the frozen parameters.
  opt_state: Any


def is_trainable(lora_rank: int, train_vision: bool = False):
  """An nnx filter: (path, variable) -> whether the parameter trains."""
  def keep(path, var) -> bool:
    names = [str(p) for p in path]
    if not isinstance(var, nnx.Param):
      return False
    if names[0] == "visual":
      return train_vision or names[1] in MERGER
    if names[0] == "token_rows":  # Added tokens' rows (`<|emb|>`) over a frozen vocabulary.
      return True
    if lora_rank > 0:
      return isinstance(var, nnx.LoRAParam)
    return True
  return keep


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, Any]:
  """AdamW with linear warmup (none when `warmup_steps` is 0) and cosine decay, weight decay on
  matrices only, and global-norm clipping."""
  end = optim.lr * optim.final_lr_fraction
  warmup = min(optim.warmup_steps, total_steps - 1)
  if warmup > 0:
    schedule = optax.warmup_cosine_decay_schedule(
      0.0, optim.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1), end_value=end)
  else:
    schedule = optax.cosine_decay_schedule(optim.lr, max(total_steps, 1),
                                           alpha=optim.final_lr_fraction)
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
  tx = optax.chain(
    optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip > 0 else optax.identity(),
    optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                weight_decay=optim.weight_decay, mask=decay_mask))
  return tx, schedule


def split_model(model: QwenVL, lora_rank: int, train_vision: bool = False):
  """(graphdef, trainable state, frozen state)."""
  return nnx.split(model, is_trainable(lora_rank, train_vision), ...)


def init_state(model: QwenVL, tx: optax.GradientTransformation, *, lora_rank: int,
               temperature: float, learn_temperature: bool, train_vision: bool = False,
               mesh=None):
  """Returns (graphdef, TrainState). Optimizer moments are created from the (sharded)
  parameters and keep their shardings; scalars are replicated over `mesh`."""
  graphdef, trainable, frozen = split_model(model, lora_rank, train_vision)
  params = {"model": trainable}
  if learn_temperature:
    params["log_scale"] = jnp.asarray(math.log(1.0 / temperature), jnp.float32)
  state = TrainState(jnp.zeros((), jnp.int32), params, frozen, tx.init(params))
  if mesh is not None:
    def on_mesh(x):
      if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding):
        return x
      return jax.device_put(x, sharding.replicated(mesh))
    state = jax.tree.map(on_mesh, state)
  return graphdef, state


def shardings_of(tree: Any) -> Any:
  """The sharding of every leaf (to pin a jitted step's inputs and outputs)."""
  return jax.tree.map(lambda x: x.sharding, tree)
