"""Qwen2-VL-2B with its published dimensions.

Usage: --config=configs/qwen2_vl_2b.py[:dtype=bfloat16,param_dtype=float32,remat=full]
"""

from configs import common


def get_config(arg: str = ""):
  text = common.text_model(vocab_size=151936, width=1536, mlp_dim=8960, num_layers=28,
                           num_heads=12, num_kv_heads=2, tie_embeddings=True)
  return common.released_model_config(arg, "qwen2_vl", text)
