"""Qwen2-VL / Qwen2.5-VL in Flax NNX.

Shape suffixes used across trace_jax: B batch, T tokens, S kv length (cache slots), N heads,
K kv heads, H head dim, D model width, F mlp width, V vocab, P patches, I image tokens, L layers.
"""

from trace_jax.model.config import ModelConfig, TextConfig, VisionConfig
from trace_jax.model.decoder import KVCache
from trace_jax.model.qwen_vl import ModelOutput, QwenVL, prepare_positions

__all__ = ["ModelConfig", "TextConfig", "VisionConfig", "KVCache", "ModelOutput", "QwenVL",
           "prepare_positions"]
