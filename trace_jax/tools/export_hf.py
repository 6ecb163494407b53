"""`python -m trace_jax.tools.export_hf --config=FILE[:ARGS] --workdir=DIR --out=DIR`.

Restores the newest checkpoint of a training run (as `trace_jax.eval` does), merges its LoRA
adapters and writes a Hugging Face directory with the tokenizer and a README on reading the
embedding with transformers (`trace_jax/infer/export.py` does the work). When `ckpt.init_from`
is a Hugging Face directory, its config.json fields and processor files are carried over.
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from trace_jax import devices

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].")
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_OUT = flags.DEFINE_string("out", None, "Output Hugging Face directory.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"],
                           "Dtype of the written weights (float32 reproduces trace_jax exactly).")


def main(argv):
  del argv
  config = _CONFIG.value
  devices.split_cpu(config.cpu_devices)  # Before JAX initialises its backend.
  from trace_jax import sharding  # After XLA_FLAGS: these initialise JAX.
  from trace_jax.data.setup import marker_id
  from trace_jax.eval.mbeir_eval import load_model
  from trace_jax.infer.export import export
  from trace_jax.model.hf_config import read_hf_config

  with sharding.use_rules(config.sharding_rules or sharding.DEFAULT_RULES):
    model, tok, step = load_model(config, _WORKDIR.value)[:3]  # (model, tokenizer, step, ...)
  base = config.ckpt.init_from
  hf_base = bool(base) and os.path.exists(os.path.join(base, "config.json"))
  export(model, _OUT.value, tokenizer=tok, dtype=_DTYPE.value,
         base_config=read_hf_config(base) if hf_base else None, readout=config.loss.readout,
         eor_token_id=marker_id(config.data, tok),
         compact_prompts=config.data.compact_prompts,
         cand_reasoning=config.data.cand_target != "none", processor_dir=base if hf_base else None)
  print(f"wrote {_OUT.value}: step {step}, {model.cfg.family}, readout {config.loss.readout}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir", "out"])
  app.run(main)
