"""LoRA adapters on the decoder's projections: apply, and merge back into the base weights.

`apply_lora` swaps chosen `Dense` projections of the stacked decoder layers for `LoRADense`
(base kernel frozen, `lora_a` / `lora_b` as `nnx.LoRAParam`, B zero-initialised so training starts
exactly at the base model). `merge_lora` folds the adapters into the kernels (used by export). What
is trainable is decided in `trace_jax/train/state.py`, not here.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from trace_jax import sharding
from trace_jax.model.layers import Dense, contract
from trace_jax.model.qwen_vl import QwenVL

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class LoRADense(nnx.Module):
  """base(x) + scale * dropout(x) . A . B, with A [*in, r] and B [r, *out] (stacked like base)."""

  def __init__(self, base: Dense, *, rank: int, alpha: float, dropout: float, rngs: nnx.Rngs):
    shape, axes = base.kernel[...].shape, sharding.variable_axes(base.kernel)
    lead = 1 if axes[0] == "layers" else 0
    n_in = base.n_in
    in_shape, out_shape = shape[lead:lead + n_in], shape[lead + n_in:]
    in_axes, out_axes = axes[lead:lead + n_in], axes[lead + n_in:]
    bound = 1.0 / math.sqrt(math.prod(in_shape))  # PEFT's kaiming-uniform(a=sqrt(5)) bound.
    a = jax.random.uniform(rngs.params(), (*shape[:lead], *in_shape, rank), base.kernel.dtype,
                           -bound, bound)
    self.base = base
    # The rank axis takes FSDP where the other axes leave it free (B of q/k/v/gate/up, A of
    # o/down, whose feature axes map to `tensor`), so adapters are not replicated when tensor=1.
    self.lora_a = nnx.LoRAParam(a, logical_axes=(*axes[:lead], *in_axes, "lora_rank"))
    self.lora_b = nnx.LoRAParam(jnp.zeros((*shape[:lead], rank, *out_shape), base.kernel.dtype),
                                logical_axes=(*axes[:lead], "lora_rank", *out_axes))
    self.scale = alpha / rank
    self.dropout = dropout
    self.stacked = bool(lead)

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    y = self.base(x)
    h = x
    if self.dropout > 0 and key is not None:
      keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
      h = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
    dtype = self.base.dtype
    xa = contract(h, self.lora_a[...].astype(dtype), self.base.n_in)
    return y + self.scale * contract(xa, self.lora_b[...].astype(dtype), 1)

  def merged_kernel(self) -> jax.Array:
    """base kernel + scale * A . B, in the base kernel's layout and dtype."""
    a, b = self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
    product = (jax.vmap(lambda a_, b_: jnp.tensordot(a_, b_, axes=1)) if self.stacked
               else lambda a_, b_: jnp.tensordot(a_, b_, axes=1))
    kernel = self.base.kernel[...]
    return (kernel.astype(jnp.float32) + self.scale * product(a, b)).astype(kernel.dtype)


def apply_lora(model: QwenVL, *, rank: int, alpha: float, dropout: float = 0.0,
               targets: Sequence[str] = TARGETS, rngs: nnx.Rngs) -> QwenVL:
  """Wraps `targets` projections of every decoder layer in LoRA; returns the same model."""
  unknown = set(targets) - set(TARGETS)
  if unknown:
    raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {TARGETS}")
  layers = model.decoder.layers
  for name in targets:
    setattr(layers, name, LoRADense(getattr(layers, name), rank=rank, alpha=alpha,
                                    dropout=dropout, rngs=rngs))
  return model


def merge_lora(model: QwenVL) -> QwenVL:
  """Folds every adapter into its base kernel and removes the adapters; returns the same model."""
  layers = model.decoder.layers
  for name in TARGETS:
    module = getattr(layers, name)
    if isinstance(module, LoRADense):
      module.base.kernel.set_value(module.merged_kernel())
      setattr(layers, name, module.base)
  return model
