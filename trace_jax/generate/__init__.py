"""Text generation with a QwenVL: a slot-based continuous-batching engine (`Engine`), the plain
functions `generate` and `score`, and the sampling rules. Used by the routing encoder and the
M-BEIR-CoT teacher; it trains nothing."""

from trace_jax.generate.api import generate, score
from trace_jax.generate.engine import Engine, Finished, Request
from trace_jax.generate.sampling import Sampling

__all__ = ["Engine", "Finished", "Request", "Sampling", "generate", "score"]
