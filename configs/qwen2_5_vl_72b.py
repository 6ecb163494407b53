"""Qwen2.5-VL-72B with its published dimensions: the teacher users pick for M-BEIR-CoT
(Think-Then-Embed's reasoner-teacher), also trainable as a retriever backbone.

Usage: --config=configs/qwen2_5_vl_72b.py[:dtype=bfloat16,param_dtype=float32,remat=full]

As the teacher, `tools/teach` loads the checkpoint in `configs/teach.py`'s `dtype` and
`param_dtype` (bfloat16, ~146 GB: one replica per v5p or v6e host), not this file's; `tools/
aot_compile --generation --config=configs/qwen2_5_vl_72b.py
--teach_config=configs/teach.py:teacher=72b` compiles that program (`docs/aot.md`).
"""

from configs import common


def get_config(arg: str = ""):
  text = common.text_model(vocab_size=152064, width=8192, mlp_dim=29568, num_layers=80,
                           num_heads=64, num_kv_heads=8, tie_embeddings=False)
  return common.released_model_config(arg, "qwen2_5_vl", text)
