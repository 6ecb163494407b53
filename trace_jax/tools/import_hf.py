"""`python -m trace_jax.tools.import_hf --hf_dir=DIR --out=DIR`: HF checkpoint -> Orbax params.

Reads a Qwen2-VL / Qwen2.5-VL directory tensor by tensor onto a mesh of all local devices (FSDP),
adds `<|emb|>` to the tokenizer (when the directory has a `tokenizer.json`) with its embedding
rows set to the mean of the trained rows, and writes `OUT/params` (Orbax),
`OUT/model_config.json` and `OUT/tokenizer.json`.
"""

from __future__ import annotations

import os

from absl import app, flags

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory (must not hold a checkpoint).")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                                 "Dtype of the stored parameters.")
_MESH = flags.DEFINE_string("mesh", "1,-1,1", "data,fsdp,tensor sizes of the import mesh.")


def main(argv):
  del argv
  from trace_jax import sharding
  from trace_jax.data.tokenizer import HFTokenizer
  from trace_jax.model import params_io
  from trace_jax.model.hf_io import load_hf
  from trace_jax.model.vocab import add_token_rows

  if os.path.exists(os.path.join(_OUT.value, "params")):
    raise FileExistsError(f"{_OUT.value}/params exists; refusing to overwrite a checkpoint")
  mesh = sharding.make_mesh(*(int(s) for s in _MESH.value.split(",")))
  model, cfg = load_hf(_HF_DIR.value, param_dtype=_PARAM_DTYPE.value, mesh=mesh)
  if os.path.exists(os.path.join(_HF_DIR.value, "tokenizer.json")):
    tok = HFTokenizer.from_dir(_HF_DIR.value)
    model = add_token_rows(model, tok.added_ids, tok.num_base_tokens)
    tok.save(_OUT.value)
  params_io.save_params(model, _OUT.value)
  print(f"wrote {_OUT.value}: {cfg.family}, vocab {model.cfg.text.vocab_size}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["hf_dir", "out"])
  app.run(main)
