"""trace_jax: TRACE (reason, then embed) multimodal retrieval in JAX."""

from trace_jax.model import ModelConfig, ModelOutput, QwenVL

__all__ = ["ModelConfig", "ModelOutput", "QwenVL"]
