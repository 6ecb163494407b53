"""A pretrained backbone for runs that start from one that does not exist yet: the demo's.

A config with a `backbone` section (`workdir`, `hf_dir`, `config`: the experiment config of an
LM-only pretraining run, `data.target="lm"`) fine-tunes from `ckpt.init_from = backbone.hf_dir`.
`ensure` trains that run in `backbone.workdir` (resuming it when interrupted) and writes its
final weights as a Hugging Face directory with the tokenizer, the form a released Qwen2.5-VL
takes, into a temporary folder that is renamed to `hf_dir` once complete: a later run, the
ablation or a sweep, finds it and reuses it. Fine-tuning itself is the ordinary path
(`train.setup.create_model`).
"""

from __future__ import annotations

import os
import shutil

import jax

from trace_jax import sharding
from trace_jax.data.tokenizer import SentencePieceTokenizer
from trace_jax.model.hf_io import save_hf
from trace_jax.train import loop, trained


def ensure(spec, say=print) -> str:
  """Builds the backbone `spec` describes unless `spec.hf_dir` holds one; returns `hf_dir`.

  Raises:
    RuntimeError: it must be built but the job has several processes (build it with one).
  """
  out = spec.hf_dir
  if os.path.isfile(os.path.join(out, "config.json")):
    say(f"backbone: reusing {out} (built by an earlier run; delete it to rebuild)")
    return out
  if jax.process_count() > 1:
    raise RuntimeError(f"backbone {out} is missing: build it with one process first "
                       "(python -m trace_jax.main on this config with one process)")
  config = spec.config
  say(f"backbone: building {out}: {config.total_steps} steps of LM-only pretraining in "
      f"{spec.workdir}, then a Hugging Face export")
  loop.run(config, spec.workdir)
  with sharding.use_rules(config.sharding_rules or sharding.DEFAULT_RULES):
    model, tok, step, _ = trained.load_model(config, spec.workdir, None)
  partial = f"{out}.partial"
  shutil.rmtree(partial, ignore_errors=True)
  save_hf(model, partial, dtype="float32")
  if not isinstance(tok, SentencePieceTokenizer):
    raise TypeError(f"the backbone's tokenizer is a {type(tok).__name__}; expected the demo "
                    "world's SentencePiece model")
  tok.save(partial)
  os.replace(partial, out)
  say(f"backbone: wrote {out} (step {step})")
  return out
