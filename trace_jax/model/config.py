"""Frozen model configuration: the typed boundary between ml-collections and the model.

This module holds the architecture hyper-parameters of Qwen2-VL and Qwen2.5-VL. It does not read
Hugging Face `config.json` files (see `hf_config.py`) and knows nothing of training.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots")


def dtype_name(dtype: Any) -> str:
  """The name in `DTYPES` of a dtype given as a name ("bfloat16") or as JAX users write it
  (`jnp.bfloat16`, `np.float32`, `np.dtype("float16")`)."""
  if isinstance(dtype, str):
    name = dtype
  else:
    try:
      name = np.dtype(dtype).name
    except TypeError:
      name = repr(dtype)
  if name not in DTYPES:
    raise ValueError(f"dtype {dtype!r}; expected one of {sorted(DTYPES)} (a name or a dtype)")
  return name


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The vision tower (ViT with 2-D RoPE) and its 2x2 patch merger."""

  depth: int
  width: int  # `embed_dim` in Qwen2-VL, `hidden_size` in Qwen2.5-VL.
  mlp_dim: int
  num_heads: int
  out_width: int  # Merger output width: the decoder width.
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  in_channels: int = 3
  # Qwen2.5-VL only: window attention except in the `fullatt_block_indexes` blocks.
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = ()
  act: str = "silu"  # "silu" (gated MLP, Qwen2.5-VL) or "quick_gelu" (fc1/fc2, Qwen2-VL).
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The Qwen2 decoder with multimodal RoPE."""

  vocab_size: int
  width: int
  mlp_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  mrope_section: tuple[int, int, int]
  rope_theta: float = 1000000.0
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A whole Qwen2-VL / Qwen2.5-VL model."""

  family: str
  text: TextConfig
  vision: VisionConfig
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  dtype: str = "bfloat16"  # Compute dtype.
  param_dtype: str = "float32"
  remat: str = "none"  # Rematerialisation of each scanned layer: none | full | dots.

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
    for name in ("dtype", "param_dtype"):  # Kept as names (dtype objects are accepted).
      try:
        object.__setattr__(self, name, dtype_name(getattr(self, name)))
      except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; expected one of {REMAT_POLICIES}")
    t = self.text
    if t.width % t.num_heads or t.num_heads % t.num_kv_heads:
      raise ValueError(f"heads do not divide: width={t.width}, heads={t.num_heads}, "
                       f"kv_heads={t.num_kv_heads}")
    if 2 * sum(t.mrope_section) != t.head_dim:
      raise ValueError(f"mrope_section {t.mrope_section} must sum to head_dim/2 = "
                       f"{t.head_dim // 2}")
    if self.vision.width % self.vision.num_heads:
      raise ValueError("vision width must be divisible by vision heads")

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """Builds from a plain mapping (e.g. `config.model.to_dict()`); unknown keys raise."""
    d = dict(d)
    text = _build(TextConfig, d.pop("text"), "model.text")
    vision = _build(VisionConfig, d.pop("vision"), "model.vision")
    return _build(cls, dict(d, text=text, vision=vision), "model")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _build(cls, d: Mapping[str, Any], where: str):
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = set(d) - fields
  if unknown:
    raise ValueError(f"unknown {where} fields: {sorted(unknown)}")
  kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
  return cls(**kw)
