"""trace_jax: TRACE (reason, then embed) multimodal retrieval in JAX.

Public surface: the model (`QwenVL`, `ModelConfig`, `ModelOutput`) and Hugging Face checkpoint
I/O (`load_hf`, `save_hf`).
"""

from trace_jax.model import ModelConfig, ModelOutput, QwenVL
from trace_jax.model.hf_io import load_hf, save_hf

__all__ = ["ModelConfig", "ModelOutput", "QwenVL", "load_hf", "save_hf"]
