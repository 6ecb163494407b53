"""The M-BEIR-CoT teacher: the paper's three phases (assess, generate, verify) run with an open
Qwen2-VL / Qwen2.5-VL checkpoint (or a trace_jax run) through the generation engine, writing the
raw file `tools/build_cot` filters. The command is `trace_jax.tools.teach`; this package holds
the queries it reads (`items`), its prompts (`prompting`), its resumable output (`shards`) and the
phases (`phases`). It trains nothing."""
