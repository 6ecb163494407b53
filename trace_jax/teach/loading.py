"""Loading a teacher (or verifier): a Hugging Face Qwen2-VL / Qwen2.5-VL directory, or a
trace_jax run directory (its saved config, newest checkpoint and tokenizer), placed on this
process's devices (`config.mesh`; a Hugging Face teacher in `config.dtype` and
`config.param_dtype`)."""

from __future__ import annotations

import os

import jax

from trace_jax import sharding
from trace_jax.data.tokenizer import HFTokenizer
from trace_jax.model.hf_io import load_hf
from trace_jax.teach.phases import Teacher
from trace_jax.teach.prompting import FORMATS
from trace_jax.train import trained

DEFAULT_GRID = (1, 16, 16)


def load_teacher(path: str, config, root: str) -> Teacher:
  """The teacher at `path` on a mesh of this process's devices."""
  mesh = sharding.make_mesh(*config.mesh, devices=jax.local_devices())
  grid = tuple(config.generate.image_grid)
  output_format = config.generate.format
  if output_format and output_format not in FORMATS:
    raise ValueError(f"generate.format={output_format!r}; expected one of {FORMATS}")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    run = trained.read_config(path)
    model, tok, _, _ = trained.load_model(run, path, mesh)
    return Teacher(model, tok, mesh, grid or tuple(run.data.image_grid), root,
                   output_format or "trace", run.data.compact_prompts)
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"--teacher={path}: neither a Hugging Face directory (config.json) "
                            "nor a trace_jax run (checkpoints/)")
  model, _ = load_hf(path, dtype=config.dtype, param_dtype=config.param_dtype, mesh=mesh)
  return Teacher(model, HFTokenizer.from_dir(path), mesh, grid or DEFAULT_GRID, root,
                 output_format or "tagged")
