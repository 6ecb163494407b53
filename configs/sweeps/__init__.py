"""Sweeps as data: each `configs/sweeps/<name>.py` defines `get_sweep() -> list[dict]`.

Every dict is one variant: a `"name"` (its folder under the sweep's workdir; letters, digits,
`.`, `_`, `-`) and flat dotted config overrides such as `{"loss.lambda_gen": 0.5}`, passed to
`trace_jax.main` as `--config.loss.lambda_gen=0.5`. `python -m trace_jax.tools.sweep` runs them
(docs/sweeps.md). Like configs, sweep files import neither jax nor trace_jax.
"""
