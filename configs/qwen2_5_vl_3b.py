"""Qwen2.5-VL-3B with its published dimensions.

Usage: --config=configs/qwen2_5_vl_3b.py[:dtype=bfloat16,param_dtype=float32,remat=full]
"""

from configs import common


def get_config(arg: str = ""):
  text = common.text_model(vocab_size=151936, width=2048, mlp_dim=11008, num_layers=36,
                           num_heads=16, num_kv_heads=2, tie_embeddings=True)
  return common.released_model_config(arg, "qwen2_5_vl", text)
