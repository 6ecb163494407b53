"""Building blocks shared by the vision tower and the decoder: dense, norms, RoPE, attention.

Every parameter carries `logical_axes` metadata (see `trace_jax/sharding.py`). A `stack` argument
adds a leading "layers" axis so that a whole tower of blocks is one set of arrays that
`scan_layers` runs with `jax.lax.scan`. Dense products and attention have custom VJPs:
autodiff's gradients, with each dot's operands ordered for XLA:CPU (`_contract`, `_attend`).
Nothing here knows about checkpoints or losses.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

_INIT_STD = 0.02  # transformers' `initializer_range` for Qwen2-VL / Qwen2.5-VL.
# `model.remat="dots"`: keep every matrix product without batch dims (the dense layers' outputs).
DOTS_POLICY = jax.checkpoint_policies.save_from_both_policies(
  jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  jax.checkpoint_policies.save_only_these_names("dense"))


def _param(rngs: nnx.Rngs | None, shape, axes, dtype, init: str) -> nnx.Param:
  if init == "normal":
    value = _INIT_STD * jax.random.normal(rngs.params(), shape, dtype)
  elif init == "ones":
    value = jnp.ones(shape, dtype)
  else:
    value = jnp.zeros(shape, dtype)
  return nnx.Param(value, logical_axes=tuple(axes))


class Dense(nnx.Module):
  """y = x . kernel (+ bias) contracting the trailing `len(in_shape)` dims of x.

  kernel: [*stack, *in_shape, *out_shape]; bias: [*stack, *out_shape].
  """

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int],
               in_axes: Sequence[str | None], out_axes: Sequence[str | None], *,
               use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs, stack: int | None = None):
    lead, lead_axes = ((stack,), ("layers",)) if stack else ((), ())
    self.n_in = len(in_shape)
    self.dtype = dtype
    self.kernel = _param(rngs, (*lead, *in_shape, *out_shape), (*lead_axes, *in_axes, *out_axes),
                         param_dtype, "normal")
    self.bias = (_param(rngs, (*lead, *out_shape), (*lead_axes, *out_axes), param_dtype, "zeros")
                 if use_bias else None)

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """`key` is unused here; adapters that wrap a Dense (LoRA) use it for dropout."""
    del key
    y = contract(x, self.kernel[...].astype(self.dtype), self.n_in)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def contract(x: jax.Array, w: jax.Array, n: int) -> jax.Array:
  """Contracts the trailing `n` dims of x with the leading `n` dims of w.

  The product is named "dense" for `jax.checkpoint` policies: inside a custom VJP it is not a
  `dot_general` that `dots_with_no_batch_dims_saveable` would see (`DOTS_POLICY`).
  """
  return checkpoint_name(_contract(x.astype(w.dtype), w, n), "dense")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _contract(x: jax.Array, w: jax.Array, n: int) -> jax.Array:
  return jax.lax.dot_general(x, w, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())))


def _contract_fwd(x, w, n):
  return _contract(x, w, n), (x, w)


def _contract_bwd(n, res, g):
  """The gradients autodiff would give, with the weight gradient's dot ordered for XLA:CPU.

  The weight gradient contracts over the token dims, which are the major dims of both x
  [*tokens, *in] and g [*tokens, *out]; XLA:CPU's dots then transpose their left operand to put
  the contracted dims minor. Autodiff always puts g on the left; here the operand with fewer
  features goes there, so an MLP's [tokens, MLP width] gradient is never transposed (before, one
  such copy per projection was a fifth of the bench train step, docs/benchmarks.md).
  """
  x, w = res
  lead, out = x.ndim - n, w.ndim - n
  dx = jax.lax.dot_general(g, w, ((tuple(range(lead, g.ndim)), tuple(range(n, w.ndim))), ((), ())))
  tokens = (tuple(range(lead)), tuple(range(lead)))
  if math.prod(x.shape[lead:]) <= math.prod(g.shape[lead:]):
    dw = jax.lax.dot_general(x, g, (tokens, ((), ())))
  else:
    dw_t = jax.lax.dot_general(g, x, (tokens, ((), ())))  # [*out, *in]
    dw = jnp.transpose(dw_t, (*range(out, out + n), *range(out)))
  return dx, dw


_contract.defvjp(_contract_fwd, _contract_bwd)


class Norm(nnx.Module):
  """RMSNorm (Qwen2 decoder, Qwen2.5-VL vision) or LayerNorm (Qwen2-VL vision), in float32."""

  def __init__(self, dim: int, *, kind: str, eps: float, dtype, param_dtype,
               stack: int | None = None, axis_name: str = "norm"):
    lead, lead_axes = ((stack,), ("layers",)) if stack else ((), ())
    if kind not in ("rms", "layer"):
      raise ValueError(f"unknown norm kind {kind!r}")
    self.kind, self.eps, self.dtype = kind, eps, dtype
    self.scale = _param(None, (*lead, dim), (*lead_axes, axis_name), param_dtype, "ones")
    self.bias = (_param(None, (*lead, dim), (*lead_axes, axis_name), param_dtype, "zeros")
                 if kind == "layer" else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    if self.kind == "rms":
      # transformers Qwen2RMSNorm: normalise in fp32, cast back, then scale.
      y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
      return self.scale[...].astype(self.dtype) * y.astype(self.dtype)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "silu": jax.nn.silu,
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: [..., T, N, H]; cos/sin: [..., T, H] (broadcast over heads). Computed in float32."""
  x32 = x.astype(jnp.float32)
  out = x32 * cos[..., None, :] + rotate_half(x32) * sin[..., None, :]
  return out.astype(x.dtype)


def inv_frequencies(dim: int, theta: float) -> jax.Array:
  return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def attention(q_btnh: jax.Array, k: jax.Array, v: jax.Array, mask_bts: jax.Array,
              kv_layout: str = "bskh") -> jax.Array:
  """Grouped-query softmax attention with a boolean mask (True = attend); softmax in float32.

  Keys and values are [B, S, K, H] (`kv_layout="bskh"`, as projected) or [B, K, S, H] ("bksh",
  the KV cache's layout). Returns [B, T, N, H]. Rows with no visible key (padding queries) return
  an average of values and must be ignored by the caller.

  The work runs as batched matrix products over [B, K] on [K-head group x T, H] query rows and
  [S, H] keys and values, so every dot, forward and backward, reads its big [rows, S] operand in
  the layout it was written in (see `_attend`); only the small [T, H]-sized operands move.
  """
  if kv_layout not in ("bskh", "bksh"):
    raise ValueError(f"kv_layout={kv_layout!r}; expected 'bskh' or 'bksh'")
  if kv_layout == "bskh":
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  b, t, n, h = q_btnh.shape
  kv_heads = k.shape[1]
  groups = n // kv_heads
  q_bkrh = (q_btnh.reshape(b, t, kv_heads, groups, h).transpose(0, 2, 3, 1, 4)
            .reshape(b, kv_heads, groups * t, h))
  out_bkrh = _attend(q_bkrh, k, v, mask_bts)
  return out_bkrh.reshape(b, kv_heads, groups, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _bdot(a: jax.Array, b: jax.Array, a_dim: int, b_dim: int, dtype=None) -> jax.Array:
  """Matrix product batched over the leading [B, K] dims, contracting one dim of each."""
  return jax.lax.dot_general(a, b, (((a_dim,), (b_dim,)), ((0, 1), (0, 1))),
                             preferred_element_type=dtype)


def _masked_rows(x_bkrs: jax.Array, mask_bts: jax.Array, fill) -> jax.Array:
  """`where(mask, x, fill)` for rows r = (group, t) of every KV head."""
  b, kv_heads, r, s = x_bkrs.shape
  t = mask_bts.shape[1]
  x = x_bkrs.reshape(b, kv_heads, r // t, t, s)
  return jnp.where(mask_bts[:, None, None], x, fill).reshape(b, kv_heads, r, s)


def _probs(q_bkrh, k_bksh, mask_bts) -> jax.Array:
  logits = _bdot(q_bkrh, k_bksh, 3, 3, jnp.float32) / math.sqrt(q_bkrh.shape[-1])
  logits = _masked_rows(logits, mask_bts, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


@jax.custom_vjp
def _attend(q_bkrh, k_bksh, v_bksh, mask_bts):
  """softmax(q k^T / sqrt(H), masked) v on [B, K, R, H] query rows; float32 probabilities."""
  return _attend_fwd(q_bkrh, k_bksh, v_bksh, mask_bts)[0]


def _attend_fwd(q_bkrh, k_bksh, v_bksh, mask_bts):
  p = _probs(q_bkrh, k_bksh, mask_bts).astype(v_bksh.dtype)
  return _bdot(p, v_bksh, 3, 2), (q_bkrh, k_bksh, v_bksh, mask_bts, p)


def _attend_bwd(res, d_out):
  """Autodiff's gradients, with each dot that contracts over query rows taking the [R, S]
  operand (probabilities or score gradients) on the right, in its own layout: dV and dK come out
  as [B, K, H, S] and are swapped back (small). Autodiff instead transposes the [R, S] operand."""
  q, k, v, mask, p = res
  dp = _bdot(d_out, v, 3, 3, jnp.float32)
  dv = jnp.swapaxes(_bdot(d_out, p, 2, 2), 2, 3)
  ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))
  ds = _masked_rows(ds, mask, 0.0) / math.sqrt(q.shape[-1])
  dq = _bdot(ds.astype(k.dtype), k, 3, 2)
  dk = jnp.swapaxes(_bdot(q, ds.astype(q.dtype), 2, 2), 2, 3)
  return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def scan_layers(stacked: nnx.Module, body: Callable[..., Any], carry: Any, xs: Any,
                remat: str = "none") -> tuple[Any, Any]:
  """Runs `body(layer, carry, x) -> (carry, y)` over a module whose arrays are stacked on axis 0.

  The layer passed to `body` is the same module merged with one slice of the stacked state.
  """
  graphdef, state = nnx.split(stacked)

  def step(c, inputs):
    layer_state, x = inputs
    return body(nnx.merge(graphdef, layer_state), c, x)

  if remat == "full":
    step = jax.checkpoint(step)
  elif remat == "dots":
    step = jax.checkpoint(step, policy=DOTS_POLICY)
  return jax.lax.scan(step, carry, (state, xs))
