"""Qwen2.5-VL-7B with its published dimensions.

Usage: --config=configs/qwen2_5_vl_7b.py[:dtype=bfloat16,param_dtype=float32,remat=full]
"""

from configs import common


def get_config(arg: str = ""):
  text = common.text_model(vocab_size=152064, width=3584, mlp_dim=18944, num_layers=28,
                           num_heads=28, num_kv_heads=4, tie_embeddings=False)
  return common.released_model_config(arg, "qwen2_5_vl", text)
