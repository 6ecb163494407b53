"""Hugging Face safetensors <-> trace_jax parameters, streamed one tensor at a time.

`load_hf` reads a Qwen2-VL / Qwen2.5-VL directory (config.json plus one or many `*.safetensors`,
with or without `model.safetensors.index.json`) straight into sharded parameters; `save_hf` writes
the same layout back. Both accept the hub key layout (`model.layers.*`, `visual.*`) and read the
transformers 5.x one (`model.language_model.*`, `model.visual.*`). Tokenizers live in
`trace_jax/data/tokenizer.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from trace_jax import sharding
from trace_jax.model.config import DTYPES, ModelConfig, dtype_name
from trace_jax.model.hf_config import from_hf_config, read_hf_config, to_hf_config
from trace_jax.model.qwen_vl import QwenVL

INDEX_FILE = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"model(-\d+-of-\d+)?\.safetensors")  # What save_hf writes.
_LAYOUTS = ({"text": "model", "vision": "visual"},
            {"text": "model.language_model", "vision": "model.visual"})


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One checkpoint tensor and where it lives in trace_jax."""

  hf_name: str
  path: tuple[str, ...]  # nnx state path of the parameter.
  layer: int | None  # Index on the stacked "layers" axis, if any.
  hf_shape: tuple[int, ...]
  n_in: int | None  # Linear weights: number of input dims of our kernel (None: same layout).


def tensor_specs(cfg: ModelConfig, layout: dict[str, str]) -> Iterator[TensorSpec]:
  """Every tensor of the checkpoint, in a stable order."""
  t = cfg.text
  tp, vp = layout["text"], layout["vision"]
  hd, nh, kh = t.head_dim, t.num_heads, t.num_kv_heads
  yield TensorSpec(f"{tp}.embed_tokens.weight", ("embed",), None, (t.vocab_size, t.width), None)
  for i in range(t.num_layers):
    pre, lay = f"{tp}.layers.{i}", ("decoder", "layers")
    yield TensorSpec(f"{pre}.input_layernorm.weight", (*lay, "input_norm", "scale"), i,
                     (t.width,), None)
    yield TensorSpec(f"{pre}.post_attention_layernorm.weight", (*lay, "post_attn_norm", "scale"), i,
                     (t.width,), None)
    for name, heads in (("q", nh), ("k", kh), ("v", kh)):
      yield TensorSpec(f"{pre}.self_attn.{name}_proj.weight", (*lay, name, "kernel"), i,
                       (heads * hd, t.width), 1)
      yield TensorSpec(f"{pre}.self_attn.{name}_proj.bias", (*lay, name, "bias"), i,
                       (heads * hd,), None)
    yield TensorSpec(f"{pre}.self_attn.o_proj.weight", (*lay, "o", "kernel"), i,
                     (t.width, nh * hd), 2)
    for name in ("gate", "up"):
      yield TensorSpec(f"{pre}.mlp.{name}_proj.weight", (*lay, name, "kernel"), i,
                       (t.mlp_dim, t.width), 1)
    yield TensorSpec(f"{pre}.mlp.down_proj.weight", (*lay, "down", "kernel"), i,
                     (t.width, t.mlp_dim), 1)
  yield TensorSpec(f"{tp}.norm.weight", ("decoder", "norm", "scale"), None, (t.width,), None)
  if not t.tie_embeddings:
    yield TensorSpec("lm_head.weight", ("lm_head", "kernel"), None, (t.vocab_size, t.width), 1)
  yield from _vision_specs(cfg, vp)


def _vision_specs(cfg: ModelConfig, vp: str) -> Iterator[TensorSpec]:
  v = cfg.vision
  w, unit = v.width, v.spatial_merge_size**2
  layer_norm = cfg.family == "qwen2_vl"
  yield TensorSpec(f"{vp}.patch_embed.proj.weight", ("visual", "patch_embed", "kernel"), None,
                   (w, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size), 1)
  for i in range(v.depth):
    pre, lay = f"{vp}.blocks.{i}", ("visual", "blocks")
    for norm in ("norm1", "norm2"):
      yield TensorSpec(f"{pre}.{norm}.weight", (*lay, norm, "scale"), i, (w,), None)
      if layer_norm:
        yield TensorSpec(f"{pre}.{norm}.bias", (*lay, norm, "bias"), i, (w,), None)
    yield TensorSpec(f"{pre}.attn.qkv.weight", (*lay, "qkv", "kernel"), i, (3 * w, w), 1)
    yield TensorSpec(f"{pre}.attn.qkv.bias", (*lay, "qkv", "bias"), i, (3 * w,), None)
    yield TensorSpec(f"{pre}.attn.proj.weight", (*lay, "proj", "kernel"), i, (w, w), 2)
    yield TensorSpec(f"{pre}.attn.proj.bias", (*lay, "proj", "bias"), i, (w,), None)
    mlp = (("gate_proj", "gate", (v.mlp_dim, w)), ("up_proj", "up", (v.mlp_dim, w)),
           ("down_proj", "down", (w, v.mlp_dim))) if not layer_norm else \
          (("fc1", "fc1", (v.mlp_dim, w)), ("fc2", "fc2", (w, v.mlp_dim)))
    for hf, ours, shape in mlp:
      yield TensorSpec(f"{pre}.mlp.{hf}.weight", (*lay, ours, "kernel"), i, shape, 1)
      yield TensorSpec(f"{pre}.mlp.{hf}.bias", (*lay, ours, "bias"), i, (shape[0],), None)
  yield TensorSpec(f"{vp}.merger.ln_q.weight", ("visual", "merger_norm", "scale"), None, (w,), None)
  if layer_norm:
    yield TensorSpec(f"{vp}.merger.ln_q.bias", ("visual", "merger_norm", "bias"), None, (w,), None)
  yield TensorSpec(f"{vp}.merger.mlp.0.weight", ("visual", "merger_fc1", "kernel"), None,
                   (unit * w, unit * w), 2)
  yield TensorSpec(f"{vp}.merger.mlp.0.bias", ("visual", "merger_fc1", "bias"), None,
                   (unit * w,), None)
  yield TensorSpec(f"{vp}.merger.mlp.2.weight", ("visual", "merger_fc2", "kernel"), None,
                   (v.out_width, unit * w), 1)
  yield TensorSpec(f"{vp}.merger.mlp.2.bias", ("visual", "merger_fc2", "bias"), None,
                   (v.out_width,), None)


def to_ours(spec: TensorSpec, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """HF tensor -> our parameter (slice) of `shape`; torch Linear [out, in] -> kernel [in, out]."""
  if spec.n_in is None:
    return x.reshape(shape)
  return x.reshape(x.shape[0], -1).T.reshape(shape)


def to_hf(spec: TensorSpec, x: np.ndarray) -> np.ndarray:
  if spec.n_in is None:
    return x.reshape(spec.hf_shape)
  n_in = math.prod(x.shape[:spec.n_in])
  return np.ascontiguousarray(x.reshape(n_in, -1).T).reshape(spec.hf_shape)


class _Checkpoint:
  """The safetensors files of one directory, with a tensor -> file map."""

  def __init__(self, hf_dir: str):
    self.dir = hf_dir
    index = os.path.join(hf_dir, INDEX_FILE)
    if os.path.exists(index):
      with open(index) as f:
        self.where = dict(json.load(f)["weight_map"])
      self.index_name = index
    else:
      files = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
      if not files:
        raise FileNotFoundError(f"no *.safetensors files in {hf_dir}")
      self.where = {}
      for name in files:
        with safe_open(os.path.join(hf_dir, name), "numpy") as f:
          self.where.update({k: name for k in f.keys()})
      self.index_name = os.path.join(hf_dir, files[0]) if len(files) == 1 else hf_dir
    self._open: dict[str, tuple[object, set[str]]] = {}  # File name -> (handle, its tensors).

  def layout(self) -> dict[str, str]:
    for layout in _LAYOUTS:
      if f"{layout['text']}.embed_tokens.weight" in self.where:
        return layout
    raise KeyError(f"{self.index_name}: no embed_tokens.weight under any known prefix "
                   f"({[l['text'] for l in _LAYOUTS]})")

  def read(self, spec: TensorSpec) -> np.ndarray:
    if spec.hf_name not in self.where:
      raise KeyError(f"missing tensor {spec.hf_name} in {self.index_name}")
    fname = self.where[spec.hf_name]
    path = os.path.join(self.dir, fname)
    if fname not in self._open:
      handle = safe_open(path, "numpy")
      self._open[fname] = (handle, set(handle.keys()))
    handle, keys = self._open[fname]
    if spec.hf_name not in keys:  # The index names a file that does not hold the tensor.
      raise KeyError(f"missing tensor {spec.hf_name} in {path} (where {self.index_name} puts it)")
    shape = tuple(handle.get_slice(spec.hf_name).get_shape())
    if shape != spec.hf_shape:
      raise ValueError(f"tensor {spec.hf_name} in {path} has shape {shape}, "
                       f"expected {spec.hf_shape} from config.json")
    return handle.get_tensor(spec.hf_name)


def load_hf(hf_dir: str, *, dtype: Any = "bfloat16", param_dtype: Any = "float32",
            mesh: jax.sharding.Mesh | None = None, remat: str = "none"
            ) -> tuple[QwenVL, ModelConfig]:
  """Loads a Hugging Face Qwen2-VL / Qwen2.5-VL directory into a (sharded) `QwenVL`.

  Tensors are read one at a time and placed on the mesh directly (stacked layer weights are
  filled slice by slice), so no host buffer ever holds the whole model.

  Args:
    dtype, param_dtype: compute and parameter dtypes, as names ("bfloat16") or dtypes
      (`jnp.float32`).

  Returns:
    (model, model_config).
  """
  dtype, param_dtype = dtype_name(dtype), dtype_name(param_dtype)
  cfg = from_hf_config(read_hf_config(hf_dir), source=os.path.join(hf_dir, "config.json"),
                       dtype=dtype, param_dtype=param_dtype, remat=remat)
  ckpt = _Checkpoint(hf_dir)
  specs = list(tensor_specs(cfg, ckpt.layout()))
  unexpected = set(ckpt.where) - {s.hf_name for s in specs}
  if cfg.text.tie_embeddings and "lm_head.weight" in unexpected:
    _check_tied_copy(ckpt, specs[0])  # Some tied checkpoints also store the shared matrix.
    unexpected.discard("lm_head.weight")
  unexpected = sorted(unexpected)
  if unexpected:
    raise ValueError(f"{ckpt.index_name}: unexpected tensors not in a {cfg.family} model: "
                     f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
  graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: QwenVL(cfg, rngs=nnx.Rngs(0))))
  flat = dict(nnx.to_flat_state(abs_state))
  pdtype = DTYPES[param_dtype]
  values: dict[tuple, jax.Array] = {}
  for spec in specs:
    var = flat[spec.path]
    full_shape, axes = var.get_value().shape, sharding.variable_axes(var)
    stacked = spec.layer is not None
    put_shape, put_axes = (full_shape[1:], axes[1:]) if stacked else (full_shape, axes)
    x = to_ours(spec, ckpt.read(spec), put_shape).astype(pdtype)
    piece = _place(x, put_axes, mesh)
    if spec.layer is None:
      values[spec.path] = piece
      continue
    if spec.path not in values:
      values[spec.path] = _zeros(full_shape, pdtype, axes, mesh)
    values[spec.path] = _set_layer(values[spec.path], piece, spec.layer)
  for path, var in flat.items():
    if path not in values:
      raise KeyError(f"{hf_dir}: no checkpoint tensor fills parameter {'/'.join(map(str, path))}")
    flat[path] = var.replace(values[path])
  return nnx.merge(graphdef, nnx.from_flat_state(flat)), cfg


def _check_tied_copy(ckpt: "_Checkpoint", embed: TensorSpec) -> None:
  """A tied checkpoint may store lm_head.weight too; accept it only if it is the same matrix."""
  head = ckpt.read(dataclasses.replace(embed, hf_name="lm_head.weight"))
  if not np.array_equal(head, ckpt.read(embed)):
    raise ValueError(f"{ckpt.index_name}: tie_word_embeddings is true but lm_head.weight differs "
                     f"from {embed.hf_name}")


def _place(x: np.ndarray, axes, mesh) -> jax.Array:
  if mesh is None:
    return jnp.asarray(x)
  return sharding.put(x, mesh, axes)


def _zeros(shape, dtype, axes, mesh) -> jax.Array:
  if mesh is None:
    return jnp.zeros(shape, dtype)
  out = NamedSharding(mesh, sharding.logical_to_spec(axes, shape, mesh))
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=out)()


def _update_layer(full: jax.Array, piece: jax.Array, i: jax.Array) -> jax.Array:
  return jax.lax.dynamic_update_index_in_dim(full, piece.astype(full.dtype), i, axis=0)


# Donating the stacked array keeps one copy of it; its sharding carries over to the output.
_set_layer = jax.jit(_update_layer, donate_argnums=0)


def save_hf(model: QwenVL, out_dir: str, *, dtype: Any = "bfloat16",
            base_config: dict | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes `model` as a Hugging Face directory (hub key layout) that transformers loads.

  Tensors are gathered to the host one at a time and written in shards of at most
  `max_shard_bytes`, with `model.safetensors.index.json` when there is more than one. Shards and
  an index left in `out_dir` by an earlier save are removed.
  """
  cfg, dtype = model.cfg, dtype_name(dtype)
  os.makedirs(out_dir, exist_ok=True)
  hf_cfg = to_hf_config(cfg, base_config)
  hf_cfg["dtype"] = dtype
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  out_dtype = DTYPES[dtype]
  written: list[tuple[str, list[str], int]] = []  # (temporary file, tensor names, bytes)
  shard: dict[str, np.ndarray] = {}

  def flush():
    name = os.path.join(out_dir, f".shard-{len(written):05d}.tmp")
    save_file(shard, name, metadata={"format": "pt"})
    written.append((name, list(shard), sum(a.nbytes for a in shard.values())))
    shard.clear()

  for spec in tensor_specs(cfg, _LAYOUTS[0]):
    x = flat[spec.path].get_value()
    x = x[spec.layer] if spec.layer is not None else x
    arr = to_hf(spec, np.asarray(jax.device_get(x.astype(out_dtype))))
    if shard and sum(a.nbytes for a in shard.values()) + arr.nbytes > max_shard_bytes:
      flush()
    shard[spec.hf_name] = arr
  flush()
  n = len(written)
  names = (["model.safetensors"] if n == 1 else
           [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
  for (tmp, _, _), name in zip(written, names):
    os.replace(tmp, os.path.join(out_dir, name))
  if n > 1:
    weight_map = {k: name for (_, keys, _), name in zip(written, names) for k in keys}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": sum(b for _, _, b in written)},
                 "weight_map": weight_map}, f, indent=2)
  # A checkpoint written here before would otherwise be read back (its index) or merged with
  # this one (its other shards): remove what this save did not write.
  for stale in os.listdir(out_dir):
    if ((stale == INDEX_FILE and n == 1) or
        (_SHARD_NAME.fullmatch(stale) and stale not in names)):
      os.remove(os.path.join(out_dir, stale))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2)
