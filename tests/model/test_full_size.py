"""The released configs build models of exactly the released size, with no memory.

Our model is built abstractly (`nnx.eval_shape`) and the reference transformers model on torch's
meta device, from the `config.json` that `to_hf_config` writes for the same config; their
parameter counts must agree exactly, and every reference tensor must have a parameter of matching
shape on our side (via the checkpoint name table of `hf_io`).
"""

import functools
import importlib
import math

import jax
import pytest
import torch
import transformers
from flax import nnx

from trace_jax.model import factory, hf_io
from trace_jax.model.hf_config import to_hf_config
from trace_jax.model.qwen_vl import QwenVL

# Totals on the model cards (billions), rounded there; the reference count is the exact one.
PUBLISHED = {"qwen2_vl_2b": 2.21e9, "qwen2_vl_7b": 8.29e9, "qwen2_5_vl_3b": 3.75e9,
             "qwen2_5_vl_7b": 8.29e9, "qwen2_5_vl_72b": 73.4e9}
TIED = {"qwen2_vl_2b": True, "qwen2_vl_7b": False, "qwen2_5_vl_3b": True, "qwen2_5_vl_7b": False,
        "qwen2_5_vl_72b": False}
_HF_LAYOUT = {"text": "model.language_model", "vision": "model.visual"}  # transformers 5.x names.


@functools.lru_cache(maxsize=None)
def model_config(name):
  return factory.model_config(importlib.import_module(f"configs.{name}").get_config())


@functools.lru_cache(maxsize=None)
def ours(name):
  """{nnx state path: shape} of our Params, built without allocating them."""
  cfg = model_config(name)
  abstract = nnx.eval_shape(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  return {path: tuple(var.get_value().shape) for path, var in flat}


@functools.lru_cache(maxsize=None)
def reference(name):
  """The transformers model of the same config.json on the meta device."""
  cfg = model_config(name)
  if cfg.family == "qwen2_5_vl":
    config_cls = transformers.Qwen2_5_VLConfig
    model_cls = transformers.Qwen2_5_VLForConditionalGeneration
  else:
    config_cls = transformers.Qwen2VLConfig
    model_cls = transformers.Qwen2VLForConditionalGeneration
  with torch.device("meta"):
    return model_cls(config_cls(**to_hf_config(cfg)))


def reference_count(model):
  return sum(p.numel() for p in model.parameters())  # parameters() yields tied tensors once.


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_reference(name):
  ref = reference(name)
  assert ref.config.tie_word_embeddings == TIED[name] == model_config(name).text.tie_embeddings
  # Tied models share one tensor; untied ones have a separate lm_head of the embedding's shape.
  tied = ref.lm_head.weight is ref.model.language_model.embed_tokens.weight
  assert tied == TIED[name]
  want = reference_count(ref)
  got = sum(math.prod(shape) for shape in ours(name).values())
  assert got == want, f"{name}: ours {got:,} vs transformers {want:,} ({got - want:+,})"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_model_card(name):
  count = reference_count(reference(name))
  assert abs(count - PUBLISHED[name]) <= 0.01 * PUBLISHED[name], f"{name}: {count:,}"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_every_reference_tensor_has_a_matching_parameter(name):
  cfg = model_config(name)
  ref_shapes = {k: tuple(p.shape) for k, p in reference(name).named_parameters()}
  specs = list(hf_io.tensor_specs(cfg, _HF_LAYOUT))
  assert sorted(s.hf_name for s in specs) == sorted(ref_shapes)
  shapes = ours(name)
  layers_seen = {}
  for s in specs:
    assert ref_shapes[s.hf_name] == s.hf_shape, s.hf_name
    shape = shapes[s.path]
    if s.layer is not None:
      layers_seen.setdefault(s.path, set()).add(s.layer)
      shape = shape[1:]
    if s.n_in is None:  # Same layout, possibly reshaped.
      assert math.prod(shape) == math.prod(s.hf_shape), (s.hf_name, shape)
    else:  # torch Linear [out, in...] -> our kernel [in..., out...].
      assert math.prod(shape[:s.n_in]) == math.prod(s.hf_shape[1:]), (s.hf_name, shape)
      assert math.prod(shape[s.n_in:]) == s.hf_shape[0], (s.hf_name, shape)
  # Every parameter of ours is filled, stacked ones on every layer exactly once.
  assert {s.path for s in specs} == set(shapes)
  for path, layers in layers_seen.items():
    assert layers == set(range(shapes[path][0])), path


def test_abstract_build_allocates_nothing():
  abstract = nnx.eval_shape(lambda: QwenVL(model_config("qwen2_5_vl_7b"), rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_vision_tower_matches_transformers_defaults(name):
  """transformers' default vision configs are the released towers (all sizes share one ViT).

  Except Qwen2.5-VL's `hidden_size` (the ViT width), which defaults to 3584 there while every
  released checkpoint has 1280.
  """
  cfg = model_config(name)
  if cfg.family == "qwen2_5_vl":
    default, skip = transformers.Qwen2_5_VLConfig().vision_config.to_dict(), {"hidden_size"}
    out_key = "out_hidden_size"
  else:
    default, skip = transformers.Qwen2VLConfig().vision_config.to_dict(), set()
    out_key = "hidden_size"
  assert cfg.vision.width == 1280
  vision = to_hf_config(cfg)["vision_config"]
  compared = sorted(set(vision) & set(default) - {"model_type", out_key} - skip)
  assert len(compared) >= 10, compared
  assert {k: vision[k] for k in compared} == {k: default[k] for k in compared}
  assert vision[out_key] == cfg.text.width
