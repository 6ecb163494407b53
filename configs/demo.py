"""The embedded default: a tiny Qwen2.5-VL-shaped model that runs on a 2-core CPU.

Until the demo world lands, `trace_jax.main` runs one sharded forward pass of this model on a
generated batch. Usage: --config=configs/demo.py[:dtype=float32]
"""

import ml_collections

from configs import common


def get_config(arg: str = ""):
  args = common.parse_arg(arg, {"dtype": "float32"})
  c = common.base_config()
  c.model.family = "qwen2_5_vl"
  c.model.dtype = args["dtype"]
  c.model.remat = "none"
  c.model.image_token_id = 500
  c.model.video_token_id = 501
  c.model.vision_start_token_id = 502
  c.model.vision_end_token_id = 503
  c.model.text = common.text_model(vocab_size=512, width=128, mlp_dim=256, num_layers=4,
                                   num_heads=4, num_kv_heads=2, tie_embeddings=True,
                                   mrope_section=(4, 6, 6), rope_theta=10000.0)
  c.model.vision = ml_collections.ConfigDict(dict(
    depth=2, width=64, mlp_dim=128, num_heads=2, out_width=128, patch_size=14,
    temporal_patch_size=2, spatial_merge_size=2, in_channels=3, window_size=56,
    fullatt_block_indexes=(1,), act="silu", rope_theta=10000.0, norm_eps=1e-6))
  # Small models replicate most bytes; the check matters for the released sizes.
  c.max_replicated_fraction = 1.0
  c.cpu_devices = 8
  c.mesh.data = 2
  c.mesh.fsdp = -1
  c.mesh.tensor = 2
  return c
