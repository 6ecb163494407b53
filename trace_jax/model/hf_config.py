"""Hugging Face `config.json` <-> `ModelConfig` for Qwen2-VL and Qwen2.5-VL.

Reads both the hub layout (text fields at the top level, `rope_scaling`) and the transformers 5.x
layout (`text_config`, `rope_parameters`). It does not touch tensors (see `hf_io.py`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from trace_jax.model.config import ModelConfig, TextConfig, VisionConfig

_FAMILY_BY_MODEL_TYPE = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl"}


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json in {hf_dir}")
  with open(path) as f:
    return json.load(f)


def from_hf_config(hf: dict[str, Any], *, source: str = "config.json", **overrides) -> ModelConfig:
  """Builds a ModelConfig from a parsed config.json; `overrides` set e.g. dtype, param_dtype."""
  model_type = hf.get("model_type")
  if model_type not in _FAMILY_BY_MODEL_TYPE:
    raise ValueError(f"{source}: unknown architecture model_type={model_type!r}; trace_jax "
                     f"supports {sorted(_FAMILY_BY_MODEL_TYPE)}")
  family = _FAMILY_BY_MODEL_TYPE[model_type]
  text = dict(hf.get("text_config") or hf)
  if text.get("use_sliding_window"):
    raise ValueError(f"{source}: use_sliding_window=true is not supported")
  rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or hf.get("rope_scaling")
              or {})
  theta = rope.get("rope_theta", text.get("rope_theta", hf.get("rope_theta", 1000000.0)))
  if "mrope_section" not in rope:
    raise ValueError(f"{source}: no mrope_section in rope_parameters / rope_scaling")
  tie = bool(hf.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
  text_cfg = TextConfig(
    vocab_size=text["vocab_size"], width=text["hidden_size"], mlp_dim=text["intermediate_size"],
    num_layers=text["num_hidden_layers"], num_heads=text["num_attention_heads"],
    num_kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
    mrope_section=tuple(rope["mrope_section"]), rope_theta=float(theta),
    rms_norm_eps=text.get("rms_norm_eps", 1e-6), tie_embeddings=tie)
  v = hf["vision_config"]
  vrope = v.get("rope_parameters") or {}
  common = dict(depth=v["depth"], num_heads=v["num_heads"], patch_size=v.get("patch_size", 14),
                temporal_patch_size=v.get("temporal_patch_size", 2),
                spatial_merge_size=v.get("spatial_merge_size", 2),
                in_channels=v.get("in_channels", v.get("in_chans", 3)),
                rope_theta=float(vrope.get("rope_theta", 10000.0)))
  if family == "qwen2_vl":
    vision = VisionConfig(width=v["embed_dim"], mlp_dim=int(v["embed_dim"] * v.get("mlp_ratio", 4)),
                          out_width=v["hidden_size"], act=v.get("hidden_act", "quick_gelu"),
                          **common)
  else:
    vision = VisionConfig(width=v["hidden_size"], mlp_dim=v["intermediate_size"],
                          out_width=v["out_hidden_size"], act=v.get("hidden_act", "silu"),
                          window_size=v.get("window_size", 112),
                          fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", ())),
                          **common)
  names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
  ids = {k: hf[k] for k in names if k in hf}
  return ModelConfig(family=family, text=text_cfg, vision=vision, **ids, **overrides)


def to_hf_config(cfg: ModelConfig, base: dict[str, Any] | None = None) -> dict[str, Any]:
  """A transformers 5.x config.json dict for `cfg`; fields of `base` not set here are kept."""
  t, v = cfg.text, cfg.vision
  text = {
    "model_type": f"{cfg.family}_text", "vocab_size": t.vocab_size, "hidden_size": t.width,
    "intermediate_size": t.mlp_dim, "num_hidden_layers": t.num_layers,
    "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
    "rms_norm_eps": t.rms_norm_eps, "hidden_act": "silu", "use_sliding_window": False,
    "tie_word_embeddings": t.tie_embeddings,
    "rope_parameters": {"rope_type": "default", "mrope_section": list(t.mrope_section),
                        "rope_theta": t.rope_theta},
  }
  vision = {
    "model_type": f"{cfg.family}_vision",
    "depth": v.depth, "num_heads": v.num_heads, "patch_size": v.patch_size,
    "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
    "in_channels": v.in_channels, "hidden_act": v.act,
    "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
  }
  if cfg.family == "qwen2_vl":
    if v.mlp_dim % v.width:
      raise ValueError("Qwen2-VL vision mlp_dim must be a multiple of the width (mlp_ratio)")
    vision.update(embed_dim=v.width, hidden_size=v.out_width, mlp_ratio=v.mlp_dim // v.width)
  else:
    vision.update(hidden_size=v.width, intermediate_size=v.mlp_dim, out_hidden_size=v.out_width,
                  window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes))
  out = dict(base or {})
  for legacy in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "rope_scaling", "rope_theta"):
    out.pop(legacy, None)  # The nested text_config is authoritative.
  out.update(
    model_type=cfg.family,
    architectures=["Qwen2_5_VLForConditionalGeneration" if cfg.family == "qwen2_5_vl"
                   else "Qwen2VLForConditionalGeneration"],
    text_config={**(out.get("text_config") or {}), **text},
    vision_config={**(out.get("vision_config") or {}), **vision},
    tie_word_embeddings=t.tie_embeddings, image_token_id=cfg.image_token_id,
    video_token_id=cfg.video_token_id, vision_start_token_id=cfg.vision_start_token_id,
    vision_end_token_id=cfg.vision_end_token_id)
  return out
