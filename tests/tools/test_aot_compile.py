"""Ahead-of-time compilation of the real train step for a TPU slice, on this CPU machine."""

import json
import os
import subprocess
import sys

import pytest

from trace_jax.model import factory
from trace_jax.tools import aot_compile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--config=configs/demo.py:dtype=bfloat16,backbone=none", "--config.lora.rank=4",
        "--config.data.global_batch=16", "--config.data.query_len=64",
        "--config.data.cand_len=32", "--config.data.image_grid=(1,4,4)",
        "--config.loss.emb_token_id=504", "--config.mesh.data=2",
        "--config.mesh.fsdp=1", "--config.mesh.tensor=2"]


@pytest.mark.parametrize("name,want", [("v5e-4", "v5e:2x2"), ("v5e-256", "v5e:16x16"),
                                       ("v5p-8", "v5p:2x2x1"), ("v5p-128", "v5p:4x4x4"),
                                       ("v4-64", "v4:2x4x4")])
def test_topology_names(name, want):
  assert aot_compile.topology_name(name)[0] == want


def test_bad_topology_name():
  with pytest.raises(ValueError, match="unknown slice"):
    aot_compile.topology_name("v5e-3")


def test_model_flops_lora_below_full_finetuning():
  from configs import qwen2_5_vl_7b
  config = qwen2_5_vl_7b.get_config()
  cfg = factory.model_config(config)
  lora = aot_compile.model_flops(config, cfg)
  config.lora.rank = 0
  full = aot_compile.model_flops(config, cfg)
  tokens = config.data.global_batch * (config.data.query_len + config.data.cand_len)
  assert lora < full < 8 * 8.3e9 * tokens  # Full fine-tuning: about 6 N per token plus extras.
  assert full > 6 * 6.5e9 * tokens  # 6.5e9: the decoder's matmul parameters.


def test_tiny_step_compiles_for_v5e(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-m", "trace_jax.tools.aot_compile", *TINY,
                         "--topology=v5e-4"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["topology"] == "v5e-4" and result["fits"]
  assert result["hbm_bytes"] == 16 * 2**30
  assert 0 < result["per_device_bytes"] < result["hbm_bytes"]
  assert result["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}


def test_tiny_generation_compiles_for_v5e():
  """The engine's prefill and decode programs compile for a TPU slice (a teacher's sizing)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-m", "trace_jax.tools.aot_compile", *TINY,
                         "--topology=v5e-4", "--generation", "--slots=4", "--prefill_batch=2",
                         "--prompt_len=64", "--new_tokens=32"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["fits"] and result["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
  assert result["weight_bytes"] > 0 and result["decode_buffer_bytes"] > 0
  assert result["per_device_bytes"] >= max(result["prefill_bytes"], result["decode_bytes"])
