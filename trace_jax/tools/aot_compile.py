"""`python -m trace_jax.tools.aot_compile --config=FILE[:ARGS] --topology=v5p-128 [--generation]`.

Compiles the real TRACE train step ahead of time for a TPU slice on a CPU-only machine (libtpu
compile-only devices), with the config's mesh, shardings and bucket shapes, and prints as its last
line one JSON object: topology, per_device_bytes (arguments + outputs + temporaries - donated
aliases), hbm_bytes, fits, model_tflops_per_step (analytic; see `model_flops`). It runs nothing.

With `--generation` it compiles the generation engine instead (a teacher's programs): the
prefill of `--prefill_batch` prompts of `--prompt_len` tokens with one image of the config's
`data.image_grid`, and a decode chunk of `--slots` rows with caches of `--prompt_len` +
`--new_tokens` slots; it reports each program's bytes, the decode buffer's, and whether the
buffer plus the larger program fit (`fits`). The model's compute and parameter dtypes are the
teacher tool's (`--teach_config`, default `configs/teach.py`: `dtype`, `param_dtype`), so the
fit is of the program `tools.teach` runs; the model config gives only the architecture.
"""

from __future__ import annotations

import json
import math
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].")
_TOPOLOGY = flags.DEFINE_string("topology", None, "Slice name, e.g. v5e-256, v5p-128, v4-64.")
_GENERATION = flags.DEFINE_bool("generation", False, "Compile the generation engine's programs.")
_TEACH_CONFIG = config_flags.DEFINE_config_file(
  "teach_config", "configs/teach.py", "Generation: the teacher config whose dtypes to compile.")
_SLOTS = flags.DEFINE_integer("slots", 16, "Generation: rows decoding at once.")
_PREFILL_BATCH = flags.DEFINE_integer("prefill_batch", 8, "Generation: prompts per prefill.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 512, "Generation: prompt tokens.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 384, "Generation: new tokens per row.")

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


def with_teacher_dtypes(config, teach):
  """The model config with the teacher tool's compute and parameter dtypes (what
  `teach.loading.load_teacher` loads a Hugging Face teacher in)."""
  config = config.copy_and_resolve_references()
  config.model.dtype, config.model.param_dtype = teach.dtype, teach.param_dtype
  return config


def compile_generation(config, topology: str, slots: int, prefill_batch: int, prompt_len: int,
                       new_tokens: int) -> dict:
  """Bytes per device of the engine's prefill and decode programs for a TPU slice."""
  import jax
  import numpy as np
  from flax import nnx
  from jax.experimental import topologies
  from jax.sharding import NamedSharding

  from trace_jax import sharding
  from trace_jax.generate import Sampling, batching, programs
  from trace_jax.model import factory
  from trace_jax.model.qwen_vl import QwenVL
  from trace_jax.train import setup

  name, chip = topology_name(topology)
  devices = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                            devices=devices)
  cfg = factory.model_config(config)
  grid = tuple(config.data.image_grid)
  with sharding.use_rules(config.sharding_rules or sharding.DEFAULT_RULES):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: QwenVL(cfg, rngs=nnx.Rngs(0))))
    state = setup.with_shardings(state, sharding.state_shardings(state, mesh))

    def rows(shape, dtype, names):
      spec = sharding.logical_to_spec(names, shape, mesh)
      return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    b, t = prefill_batch, prompt_len
    patches = int(np.prod(grid))
    inputs = (rows((b, t), np.int32, ("act_batch", None)),
              rows((b, t), np.int32, ("act_batch", None)),
              rows((3, b, t), np.int32, (None, "act_batch", None)),
              rows((b, patches, cfg.vision.patch_dim), np.float32, ("act_batch", None, None)),
              batching.image_layout(cfg, grid), rows((b,), np.int32, ("act_batch",)))
    buf = jax.eval_shape(lambda: programs.empty_slots(cfg, slots, prompt_len + new_tokens))
    buf = setup.with_shardings(buf, programs.slots_shardings(buf, mesh))
    with jax.set_mesh(mesh):
      prefill = programs.prefill.lower(graphdef, state, *inputs, max_len=t).compile()
      decode = programs.decode_chunk.lower(
        graphdef, state, buf, np.asarray([0], np.int32), np.int32(slots + 1),
        sampling=Sampling(), steps=16).compile()

  def total(compiled):
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)

  per_device = lambda tree: sum(  # noqa: E731
    int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(tree))
  weights, buffer = per_device(state), per_device(buf)
  prefill_bytes, decode_bytes = total(prefill), total(decode)
  need = max(prefill_bytes + buffer, decode_bytes)
  return {"topology": topology, "mesh": dict(mesh.shape), "weight_bytes": weights,
          "decode_buffer_bytes": buffer, "prefill_bytes": int(prefill_bytes),
          "decode_bytes": int(decode_bytes), "per_device_bytes": int(need),
          "hbm_bytes": chip["hbm"], "fits": bool(need <= chip["hbm"]),
          "dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "slots": slots,
          "prefill_batch": b, "prompt_len": t, "new_tokens": new_tokens}


def main(argv):
  del argv
  config = _CONFIG.value
  if _GENERATION.value:
    config = with_teacher_dtypes(config, _TEACH_CONFIG.value)
    print(json.dumps(compile_generation(config, _TOPOLOGY.value, _SLOTS.value,
                                        _PREFILL_BATCH.value, _PROMPT_LEN.value,
                                        _NEW_TOKENS.value)))
    return
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
