"""`python -m trace_jax.tools.aot_compile --config=FILE[:ARGS] --topology=v5p-128`.

Compiles the real TRACE train step ahead of time for a TPU slice on a CPU-only machine (libtpu
compile-only devices), with the config's mesh, shardings and bucket shapes, and prints as its last
line one JSON object: topology, per_device_bytes (arguments + outputs + temporaries - donated
aliases), hbm_bytes, fits, model_tflops_per_step (analytic; see `model_flops`). It runs nothing.
"""

from __future__ import annotations

import json
import math
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].")
_TOPOLOGY = flags.DEFINE_string("topology", None, "Slice name, e.g. v5e-256, v5p-128, v4-64.")

GIB = 2**30
# Per-chip HBM and how a slice name counts: v4/v5p names count TensorCores (2 per chip).
CHIPS = {
  "v4": dict(hbm=32 * GIB, cores_per_chip=2, dims=3, name="v4"),
  "v5p": dict(hbm=95 * GIB, cores_per_chip=2, dims=3, name="v5p"),
  "v5e": dict(hbm=16 * GIB, cores_per_chip=1, dims=2, name="v5e"),
  "v6e": dict(hbm=32 * GIB, cores_per_chip=1, dims=2, name="v6e"),
}


# Chip count -> the slice's physical topology.
SHAPES = {
  2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
  3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
      256: "4x8x8", 512: "8x8x8"},
}


def topology_name(slice_name: str) -> tuple[str, dict]:
  """'v5p-128' -> ('v5p:4x4x4', chip info); 'v5e-256' -> ('v5e:16x16', ...)."""
  gen, _, count = slice_name.partition("-")
  chip = CHIPS.get(gen)
  shapes = SHAPES[chip["dims"]] if chip else {}
  chips = int(count) // chip["cores_per_chip"] if chip and count.isdigit() else 0
  if chips not in shapes:
    raise ValueError(f"unknown slice {slice_name!r}; use e.g. v5e-256, v5p-128, v4-64, v6e-64")
  return f"{chip['name']}:{shapes[chips]}", chip


def model_flops(config, model_cfg) -> float:
  """Model FLOPs of one step (rematerialisation not counted), per matmul: 2 x params x tokens.

  Forward: vision tower and merger over every patch; decoder over every query and candidate
  token, plus attention (4 x layers x width x T^2 per sequence); the LM head at target positions
  only (`loss.max_target_tokens` per query). Backward: none for the frozen vision tower; weight
  gradients (1 x forward) for the trainable merger; for the decoder, input gradients (1 x forward)
  plus weight gradients of what trains (the adapters under LoRA, everything otherwise); the LM
  head needs input gradients (and weight gradients when it trains).
  """
  t, v, d = model_cfg.text, model_cfg.vision, config.data
  b = d.global_batch
  tokens = b * (d.query_len + d.cand_len)
  layer = (t.width * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim
           + t.num_heads * t.head_dim * t.width + 3 * t.width * t.mlp_dim)
  decoder = (2 * t.num_layers * layer * tokens
             + 4 * t.num_layers * t.width * b * (d.query_len**2 + d.cand_len**2))
  patches = 2 * b * math.prod(d.image_grid)  # One image on each side.
  mlp_mats = 3 if model_cfg.family == "qwen2_5_vl" else 2
  vit_layer = 4 * v.width**2 + mlp_mats * v.width * v.mlp_dim
  vit = 2 * patches * (v.patch_dim * v.width + v.depth * vit_layer)
  merger = 2 * (patches // 4) * (16 * v.width**2 + 4 * v.width * v.out_width)
  head = 2 * t.width * t.vocab_size * b * config.loss.max_target_tokens
  if config.lora.rank:
    adapters = 2 * t.num_layers * len(config.lora.targets) * config.lora.rank \
        * (t.width + t.mlp_dim) * tokens  # Upper bound: each adapter at most (D + F) x r.
    forward = vit + merger + decoder + adapters + head
    backward = merger + decoder + 2 * adapters + head
  else:
    forward = vit + merger + decoder + head
    backward = merger + 2 * decoder + 2 * head
  return float(forward + backward)


def compile_step(config, topology: str):
  """Returns (compiled step, mesh, chip info, model config)."""
  import jax
  from jax.experimental import topologies

  from trace_jax import sharding
  from trace_jax.model import factory
  from trace_jax.train import setup
  from trace_jax.train import step as step_lib

  name, chip = topology_name(topology)
  devices = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                            devices=devices)
  with sharding.use_rules(config.sharding_rules or sharding.DEFAULT_RULES):
    graphdef, state, tx, schedule = setup.abstract_state(config, mesh)
    batch = setup.abstract_batch(config, mesh)
    step = step_lib.make_train_step(graphdef, step_lib.StepConfig.from_config(config), tx,
                                    schedule, mesh, jax.tree.map(lambda x: x.sharding, state))
    with jax.set_mesh(mesh):
      compiled = step.lower(state, batch).compile()
  return compiled, mesh, chip, factory.model_config(config)


def main(argv):
  del argv
  config = _CONFIG.value
  compiled, mesh, chip, model_cfg = compile_step(config, _TOPOLOGY.value)
  mem = compiled.memory_analysis()
  per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes)
  result = {
    "topology": _TOPOLOGY.value, "mesh": dict(mesh.shape), "per_device_bytes": int(per_device),
    "argument_bytes": int(mem.argument_size_in_bytes),
    "output_bytes": int(mem.output_size_in_bytes),
    "temp_bytes": int(mem.temp_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes),
    "hbm_bytes": chip["hbm"], "fits": bool(per_device <= chip["hbm"]),
    "model_tflops_per_step": round(model_flops(config, model_cfg) / 1e12, 1),
  }
  print(json.dumps(result))


if __name__ == "__main__":
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # No TPU metadata server on this host.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # Compile-only: no chip to lock.
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main)
