"""`load_hf` / `save_hf` on tiny random transformers checkpoints, and `vocab.add_token_rows`.

Import then export is bit-exact (bf16 and float32, one file or several with an index), the
transformers 5.x key layout loads too, transformers reads what `save_hf` wrote and computes the
same logits as trace_jax, broken checkpoints fail naming the tensor and file, and loading onto a
mesh gives every parameter the sharding of its logical axes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from tests.model import reference
from tests.model.reference import Case
from trace_jax import sharding
from trace_jax.model.hf_config import from_hf_config, read_hf_config
from trace_jax.model.hf_io import INDEX_FILE, load_hf, save_hf
from trace_jax.model.vocab import add_token_rows

CASES = {
  "qwen2_vl": Case("v2", "qwen2_vl", kv_heads=2, tie=False, grids=((1, 4, 8),)),
  # Several attention windows (56 px) in a non-square image.
  "qwen2_5_vl": Case("v25", "qwen2_5_vl", kv_heads=2, tie=False, grids=((1, 6, 12),)),
}
FAMILIES = tuple(CASES)
BATCH = 4  # Divisible by data * fsdp of the `mesh` fixture, so activations shard too.


class Checkpoints:
  """Tiny HF checkpoints written once per module (same weights for every layout and dtype)."""

  def __init__(self, root: str):
    self.root = root
    self._dirs: dict[tuple, str] = {}
    self._logits: dict[str, np.ndarray] = {}

  def get(self, family: str, *, tie: bool = False, dtype: str = "float32",
          max_shard_size: str | None = None) -> str:
    """The directory of `reference.hf_model` for `family` saved by `save_pretrained`; read only."""
    key = (family, tie, dtype, max_shard_size)
    if key not in self._dirs:
      model = reference.hf_model(dataclasses.replace(CASES[family], tie=tie))
      path = os.path.join(self.root, "-".join(map(str, key)))
      kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
      model.to(getattr(torch, dtype)).save_pretrained(path, **kw)
      self._dirs[key] = path
    return self._dirs[key]

  def jax_logits(self, family: str) -> np.ndarray:
    """trace_jax's float32 logits for `batch(family)` from the float32 checkpoint, unsharded."""
    if family not in self._logits:
      model, _ = load_hf(self.get(family), dtype="float32", param_dtype="float32")
      self._logits[family] = np.asarray(model(**batch(family)).logits)
    return self._logits[family]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Checkpoints:
  return Checkpoints(str(tmp_path_factory.mktemp("hf")))


def batch(family: str) -> dict:
  return reference.inputs(CASES[family], batch=BATCH)


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
  out = {}
  for name in sorted(os.listdir(hf_dir)):
    if name.endswith(".safetensors"):
      with safe_open(os.path.join(hf_dir, name), "numpy") as f:
        for key in f.keys():
          assert key not in out, f"{key} is in two files of {hf_dir}"
          out[key] = f.get_tensor(key)
  return out


def checkpoint_files(hf_dir: str) -> list[str]:
  return sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors") or n == INDEX_FILE)


def assert_bit_identical(got: dict[str, np.ndarray], want: dict[str, np.ndarray]):
  assert sorted(got) == sorted(want)
  for key, w in want.items():
    g = got[key]
    assert (g.dtype, g.shape) == (w.dtype, w.shape), key
    uint = np.dtype(f"u{w.dtype.itemsize}")
    assert np.array_equal(g.view(uint), w.view(uint)), f"{key} differs"


def params(model) -> dict[str, np.ndarray]:
  return {"/".join(map(str, path)): np.asarray(v.get_value())
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(got, want):
  got, want = params(got), params(want)
  assert sorted(got) == sorted(want)
  for key in want:
    assert got[key].dtype == want[key].dtype, key
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def write_checkpoint(out_dir: str, config_from: str, tensors: dict[str, np.ndarray],
                     config: dict | None = None) -> str:
  """One `model.safetensors` holding `tensors`, with the config.json of `config_from`."""
  os.makedirs(out_dir)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  if config is None:
    shutil.copy(os.path.join(config_from, "config.json"), out_dir)
  else:
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump(config, f)
  return out_dir


# 1. Import then export.


@pytest.mark.parametrize("family,tie,dtype,param_dtype", [
  ("qwen2_vl", False, "bfloat16", "float32"), ("qwen2_vl", False, "float32", "float32"),
  ("qwen2_vl", True, "bfloat16", "float32"), ("qwen2_5_vl", False, "bfloat16", "float32"),
  ("qwen2_5_vl", False, "float32", "float32"), ("qwen2_5_vl", True, "float32", "float32"),
  ("qwen2_5_vl", False, "bfloat16", "bfloat16")])
def test_import_export_is_bit_exact(ckpts, tmp_path, family, tie, dtype, param_dtype):
  src = ckpts.get(family, tie=tie, dtype=dtype)
  model, cfg = load_hf(src, dtype="float32", param_dtype=param_dtype)
  assert (cfg.family, cfg.text.tie_embeddings) == (family, tie)
  out = str(tmp_path / "out")
  save_hf(model, out, dtype=dtype)
  assert checkpoint_files(out) == checkpoint_files(src) == ["model.safetensors"]
  assert_bit_identical(read_tensors(out), read_tensors(src))
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["dtype"] == dtype
  assert from_hf_config(read_hf_config(out), dtype="float32", param_dtype=param_dtype) == cfg


def test_dtypes_as_jax_users_write_them(ckpts, tmp_path):
  src = ckpts.get("qwen2_5_vl")
  by_name, cfg = load_hf(src, dtype="float32", param_dtype="bfloat16")
  by_object, cfg_object = load_hf(src, dtype=jnp.float32, param_dtype=np.dtype(jnp.bfloat16))
  assert cfg_object == cfg and (cfg.dtype, cfg.param_dtype) == ("float32", "bfloat16")
  assert_same_params(by_object, by_name)
  out = str(tmp_path / "out")
  save_hf(by_object, out, dtype=jnp.bfloat16)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["dtype"] == "bfloat16"
  with pytest.raises(ValueError, match=r"int32.*bfloat16"):
    load_hf(src, dtype=jnp.int32)


# 2. Checkpoints in several files.


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_file_checkpoint_loads_and_saves(ckpts, tmp_path, family):
  single, multi = ckpts.get(family), ckpts.get(family, max_shard_size="50KB")
  assert INDEX_FILE in checkpoint_files(multi) and len(checkpoint_files(multi)) > 2
  model, _ = load_hf(multi, dtype="float32")
  assert_same_params(model, load_hf(single, dtype="float32")[0])

  out, limit = str(tmp_path / "out"), 60_000
  save_hf(model, out, dtype="float32", max_shard_bytes=limit)
  files = checkpoint_files(out)
  assert INDEX_FILE in files and len(files) > 2
  with open(os.path.join(out, INDEX_FILE)) as f:
    index = json.load(f)
  total = 0
  for name in files:
    if name == INDEX_FILE:
      continue
    with safe_open(os.path.join(out, name), "numpy") as f:
      shard = {k: f.get_tensor(k) for k in f.keys()}
    assert {k for k, v in index["weight_map"].items() if v == name} == set(shard)
    nbytes = sum(x.nbytes for x in shard.values())
    assert nbytes <= limit or len(shard) == 1, (name, nbytes)
    total += nbytes
  assert index["metadata"]["total_size"] == total
  assert_bit_identical(read_tensors(out), read_tensors(multi))
  assert_same_params(load_hf(out, dtype="float32")[0], model)


def test_save_hf_replaces_an_existing_checkpoint(ckpts, tmp_path):
  """Writing one file over a sharded checkpoint leaves no stale index or shard to be read."""
  out = str(tmp_path / "out")
  model, _ = load_hf(ckpts.get("qwen2_vl"), dtype="float32")
  save_hf(model, out, dtype="float32", max_shard_bytes=60_000)
  assert INDEX_FILE in checkpoint_files(out)
  other, _ = load_hf(ckpts.get("qwen2_vl", tie=True), dtype="float32")
  save_hf(other, out, dtype="float32")
  assert checkpoint_files(out) == ["model.safetensors"]
  assert_same_params(load_hf(out, dtype="float32")[0], other)


# 3. The transformers 5.x key layout.


def to_v5_key(key: str) -> str:
  if key.startswith("visual."):
    return "model." + key
  if key.startswith("model."):
    return "model.language_model." + key[len("model."):]
  assert key.startswith("lm_head."), key
  return key


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_v5_key_layout_loads(ckpts, tmp_path, family):
  src = ckpts.get(family)
  hub = read_tensors(src)
  assert "model.embed_tokens.weight" in hub and any(k.startswith("visual.") for k in hub)
  v5 = write_checkpoint(str(tmp_path / "v5"), src, {to_v5_key(k): v for k, v in hub.items()})
  model, cfg = load_hf(v5, dtype="float32")
  want, want_cfg = load_hf(src, dtype="float32")
  assert cfg == want_cfg
  assert_same_params(model, want)
  out = str(tmp_path / "out")
  save_hf(model, out, dtype="float32")  # Always the hub layout.
  assert_bit_identical(read_tensors(out), hub)


# 4. transformers reads what save_hf wrote.


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_save_hf_output(ckpts, tmp_path, family):
  src = ckpts.get(family)
  model, _ = load_hf(src, dtype="float32", param_dtype="float32")
  out = str(tmp_path / "out")
  save_hf(model, out, dtype="float32")
  hf, info = transformers.AutoModelForImageTextToText.from_pretrained(
    out, output_loading_info=True)
  assert type(hf).__name__ == ("Qwen2VLForConditionalGeneration" if family == "qwen2_vl"
                               else "Qwen2_5_VLForConditionalGeneration")
  assert hf.dtype == torch.float32
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  want_state = reference.hf_model(CASES[family]).state_dict()
  got_state = hf.state_dict()
  assert sorted(got_state) == sorted(want_state)
  for key, value in want_state.items():
    assert torch.equal(got_state[key], value), key

  hf_logits, _ = reference.hf_forward(hf.eval(), batch(family))
  valid = batch(family)["attention_mask"].astype(bool)
  np.testing.assert_allclose(ckpts.jax_logits(family)[valid], hf_logits[valid], atol=1e-4, rtol=0)


# 5. Errors name what is wrong and where.


SRC_FAMILY = "qwen2_5_vl"


def test_missing_tensor_names_tensor_and_file(ckpts, tmp_path):
  src = ckpts.get(SRC_FAMILY)
  tensors = read_tensors(src)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  broken = write_checkpoint(str(tmp_path / "broken"), src, tensors)
  path = os.path.join(broken, "model.safetensors")
  with pytest.raises(KeyError, match=re.escape(f"model.layers.1.mlp.up_proj.weight in {path}")):
    load_hf(broken, dtype="float32")


def _sharded_copy(ckpts, tmp_path) -> tuple[str, dict]:
  broken = str(tmp_path / "broken")
  shutil.copytree(ckpts.get(SRC_FAMILY, max_shard_size="50KB"), broken)
  with open(os.path.join(broken, INDEX_FILE)) as f:
    index = json.load(f)
  return broken, index


def _drop_from_shard(hf_dir: str, shard: str, name: str):
  path = os.path.join(hf_dir, shard)
  with safe_open(path, "numpy") as f:
    kept = {k: f.get_tensor(k) for k in f.keys() if k != name}
  assert kept, "pick a tensor that shares its shard"
  save_file(kept, path, metadata={"format": "pt"})


def test_missing_tensor_in_index_names_tensor_and_index(ckpts, tmp_path):
  broken, index = _sharded_copy(ckpts, tmp_path)
  name = "visual.blocks.1.attn.qkv.bias"
  _drop_from_shard(broken, index["weight_map"].pop(name), name)
  with open(os.path.join(broken, INDEX_FILE), "w") as f:
    json.dump(index, f)
  with pytest.raises(KeyError, match=re.escape(f"{name} in {os.path.join(broken, INDEX_FILE)}")):
    load_hf(broken, dtype="float32")


def test_tensor_listed_in_index_but_absent_from_shard_names_both(ckpts, tmp_path):
  broken, index = _sharded_copy(ckpts, tmp_path)
  name = "visual.blocks.1.attn.qkv.bias"
  shard = index["weight_map"][name]
  _drop_from_shard(broken, shard, name)
  with pytest.raises(KeyError, match=re.escape(name)) as err:
    load_hf(broken, dtype="float32")
  assert os.path.join(broken, shard) in str(err.value)


def test_wrong_shape_names_tensor_file_and_shapes(ckpts, tmp_path):
  src = ckpts.get(SRC_FAMILY)
  tensors = read_tensors(src)
  name = "model.layers.0.self_attn.k_proj.weight"
  tensors[name] = tensors[name][:16]
  broken = write_checkpoint(str(tmp_path / "broken"), src, tensors)
  msg = f"tensor {name} in {os.path.join(broken, 'model.safetensors')} has shape (16, 64)"
  with pytest.raises(ValueError, match=re.escape(msg)) as err:
    load_hf(broken, dtype="float32")
  assert "(32, 64)" in str(err.value)


def test_unknown_model_type_names_config_json(ckpts, tmp_path):
  src = ckpts.get(SRC_FAMILY)
  config = read_hf_config(src)
  config["model_type"] = "llava"
  broken = write_checkpoint(str(tmp_path / "broken"), src, read_tensors(src), config)
  with pytest.raises(ValueError, match=re.escape(os.path.join(broken, "config.json"))) as err:
    load_hf(broken, dtype="float32")
  assert "'llava'" in str(err.value)


def test_unexpected_tensor_is_named(ckpts, tmp_path):
  src = ckpts.get(SRC_FAMILY)
  tensors = read_tensors(src)
  tensors["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"]
  broken = write_checkpoint(str(tmp_path / "broken"), src, tensors)
  with pytest.raises(ValueError, match=r"unexpected tensors.*'model\.layers\.2\.mlp\.up_proj\."):
    load_hf(broken, dtype="float32")


def test_tied_checkpoint_may_store_the_shared_matrix_twice(ckpts, tmp_path):
  src = ckpts.get(SRC_FAMILY, tie=True)
  tensors = read_tensors(src)
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  copy = write_checkpoint(str(tmp_path / "copy"), src, tensors)
  assert_same_params(params(load_hf(copy, dtype="float32")[0]),
                     params(load_hf(src, dtype="float32")[0]))
  tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
  differs = write_checkpoint(str(tmp_path / "differs"), src, tensors)
  with pytest.raises(ValueError, match="lm_head.weight differs"):
    load_hf(differs, dtype="float32")


def test_missing_files_are_named(ckpts, tmp_path):
  no_config = str(tmp_path / "no_config")
  os.makedirs(no_config)
  with pytest.raises(FileNotFoundError, match=re.escape(f"no config.json in {no_config}")):
    load_hf(no_config)
  no_weights = str(tmp_path / "no_weights")
  os.makedirs(no_weights)
  shutil.copy(os.path.join(ckpts.get(SRC_FAMILY), "config.json"), no_weights)
  with pytest.raises(FileNotFoundError, match=re.escape(f"no *.safetensors files in {no_weights}")):
    load_hf(no_weights)


# 6. Loading onto a mesh.


def test_load_onto_mesh_shards_by_logical_axes(ckpts, mesh):
  family = "qwen2_5_vl"
  model, _ = load_hf(ckpts.get(family), dtype="float32", param_dtype="float32", mesh=mesh)
  n_sharded = 0
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    x = v.get_value()
    want = sharding.logical_to_spec(sharding.variable_axes(v), x.shape, mesh)
    assert x.sharding.mesh == mesh, path
    assert x.sharding.spec == want, path
    n_sharded += not x.sharding.is_fully_replicated
  assert n_sharded > 0
  assert_same_params(model, load_hf(ckpts.get(family), dtype="float32")[0])
  with jax.set_mesh(mesh):
    logits = model(**batch(family)).logits
  assert not logits.sharding.is_fully_replicated
  valid = batch(family)["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[valid], ckpts.jax_logits(family)[valid],
                             atol=1e-5, rtol=0)


# 7. Rows for added tokens (`<|emb|>`).


def _rows(model) -> tuple[np.ndarray, np.ndarray | None]:
  """(embedding [V, D], unembedding as [V, D] or None when tied)."""
  embed = np.asarray(model.embed[...])
  head = None if model.lm_head is None else np.asarray(model.lm_head.kernel[...]).T
  return embed, head


@pytest.mark.parametrize("tie", [False, True])
def test_add_token_rows_grows_vocab_with_mean_row(ckpts, tie):
  model, _ = load_hf(ckpts.get("qwen2_vl", tie=tie), dtype="float32")
  vocab, trained = model.cfg.text.vocab_size, 290
  before = _rows(model)
  model = add_token_rows(model, [vocab], trained)
  assert model.cfg.text.vocab_size == vocab + 1
  after = _rows(model)
  assert (after[1] is None) == tie
  for old, new in zip(before, after):
    if old is None:
      continue
    assert new.shape == (vocab + 1, old.shape[1])
    np.testing.assert_array_equal(new[:vocab], old)
    np.testing.assert_allclose(new[vocab], old[:trained].astype(np.float64).mean(0), atol=1e-7,
                               rtol=0)
    assert not np.allclose(new[vocab], old[:vocab].mean(0), atol=1e-5)  # Only trained rows.
  assert model.logits(np.ones((1, model.cfg.text.width), np.float32)).shape == (1, vocab + 1)


def test_add_token_rows_inside_vocab_overwrites_only_that_row(ckpts):
  model, _ = load_hf(ckpts.get("qwen2_vl"), dtype="float32")
  vocab, trained, new_id = model.cfg.text.vocab_size, 290, 296
  before = _rows(model)
  model = add_token_rows(model, [new_id], trained)
  assert model.cfg.text.vocab_size == vocab
  for old, new in zip(before, _rows(model)):
    assert new.shape == old.shape
    others = np.arange(vocab) != new_id
    np.testing.assert_array_equal(new[others], old[others])
    np.testing.assert_allclose(new[new_id], old[:trained].astype(np.float64).mean(0), atol=1e-7,
                               rtol=0)


def test_add_token_rows_on_mesh(ckpts, mesh):
  src = ckpts.get("qwen2_vl")
  model, _ = load_hf(src, dtype="float32", mesh=mesh)
  want, _ = load_hf(src, dtype="float32")
  vocab = model.cfg.text.vocab_size
  model = add_token_rows(model, [vocab, vocab + 1], 290)
  want = add_token_rows(want, [vocab, vocab + 1], 290)
  assert model.cfg == want.cfg and model.cfg.text.vocab_size == vocab + 2
  for var in (model.embed, model.lm_head.kernel):
    x = var[...]
    assert x.sharding.spec == sharding.logical_to_spec(sharding.variable_axes(var), x.shape, mesh)
    assert "tensor" in x.sharding.spec  # vocab + 2 rows still split over the tensor axis.
  for got, exp in zip(_rows(model), _rows(want)):
    np.testing.assert_array_equal(got[:vocab], exp[:vocab])
    np.testing.assert_allclose(got[vocab:], exp[vocab:], atol=1e-7, rtol=0)


def test_add_token_rows_rejects_more_trained_rows_than_the_model_has(ckpts):
  model, _ = load_hf(ckpts.get("qwen2_vl"), dtype="float32")
  vocab = model.cfg.text.vocab_size
  with pytest.raises(ValueError, match=f"{vocab + 26}.*{vocab}"):
    add_token_rows(model, [vocab + 26], vocab + 26)
