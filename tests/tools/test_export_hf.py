"""`trace_jax.infer.export` (what `tools/export_hf.py` runs) on tiny random Qwen2.5-VL models.

A LoRA model with non-zero adapters is exported; transformers loads the directory with no missing
or unexpected keys and computes the LoRA model's last-layer hidden states and embedding; the
merge is real (adapted tensors change, the rest is bit-exact) and leaves the caller's model
alone; the tokenizer keeps `<|emb|>` at its id; the README's own code reproduces trace_jax's
candidate embedding. The CLI itself is not imported here (its absl flags are process-global).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

from tests.data.tokenizer_fixture import qwen_like_tokenizer, write_hf_dir
from tests.model import reference
from tests.model.reference import Case
from trace_jax.data import prompts
from trace_jax.data.tokenizer import EMB_TOKEN, HFTokenizer, SentencePieceTokenizer
from trace_jax.infer import export as export_lib
from trace_jax.model.hf_io import load_hf
from trace_jax.model.lora import TARGETS, LoRADense, apply_lora
from trace_jax.model.vocab import add_token_rows
from trace_jax.model.readout import READOUTS, readout_index

CASE = Case("v25", "qwen2_5_vl", kv_heads=2, tie=False, grids=((1, 4, 8),))
EMB = 295  # Stands in for `<|emb|>` in the reference batch (its text ids are below 280).
HF_PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
           "down": "mlp.down_proj"}


def lora_model(src: str, seed: int = 0):
  """`load_hf(src)` in float32 with rank-4 adapters whose B matrices are random (not zero)."""
  model, _ = load_hf(src, dtype="float32", param_dtype="float32")
  apply_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(seed))
  key = jax.random.key(seed + 1)
  for name in TARGETS:
    module = getattr(model.decoder.layers, name)
    key, sub = jax.random.split(key)
    b = module.lora_b[...]
    module.lora_b.set_value(0.05 * jax.random.normal(sub, b.shape, b.dtype))
  return model


def l2(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
  out = {}
  for name in os.listdir(hf_dir):
    if name.endswith(".safetensors"):
      with safe_open(os.path.join(hf_dir, name), "numpy") as f:
        out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


def with_emb(batch: dict) -> dict:
  """The reference batch with its last valid token of every row replaced by `EMB`."""
  ids = batch["input_ids"].copy()
  last = batch["attention_mask"].sum(1) - 1
  ids[np.arange(len(ids)), last] = EMB
  return dict(batch, input_ids=ids)


class Exported:
  """One LoRA model, its trace_jax outputs on the reference batch, and its export."""

  def __init__(self, root: str):
    self.src = os.path.join(root, "src")
    reference.hf_model(CASE).save_pretrained(self.src)
    self.model = lora_model(self.src)
    self.batch = with_emb(reference.inputs(CASE))
    kw = {k: jnp.asarray(v) for k, v in self.batch.items()}
    self.hidden = np.asarray(self.model(**kw, return_logits=False).hidden_states)
    self.out = export_lib.export(self.model, os.path.join(root, "out"), dtype="float32")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Exported:
  return Exported(str(tmp_path_factory.mktemp("export")))


@pytest.fixture(scope="module")
def hf_out(exported):
  """(transformers model of the export, its loading info, its last-layer hidden states)."""
  hf, info = transformers.AutoModelForImageTextToText.from_pretrained(
    exported.out, output_loading_info=True)
  _, hidden = reference.hf_forward(hf.eval(), exported.batch)
  return hf, info, hidden


def test_transformers_loads_the_export_with_no_missing_keys(hf_out):
  hf, info, _ = hf_out
  assert type(hf).__name__ == "Qwen2_5_VLForConditionalGeneration"
  assert hf.dtype == torch.float32
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_transformers_hidden_states_equal_the_lora_model(exported, hf_out):
  valid = exported.batch["attention_mask"].astype(bool)
  np.testing.assert_allclose(hf_out[2][valid], exported.hidden[valid], atol=1e-4, rtol=0)


def test_hidden_states_last_is_after_the_final_norm(exported, hf_out):
  """transformers 5.x: `hidden_states[-1]` is norm(last layer's output), not the raw output."""
  hf = hf_out[0]
  text = hf.model.language_model
  seen = []

  def record(module, args, output):
    del module, args
    seen.append(output[0] if isinstance(output, tuple) else output)

  hook = text.layers[-1].register_forward_hook(record)
  kw = {k: torch.tensor(v) for k, v in exported.batch.items()}
  kw["mm_token_type_ids"] = (kw["input_ids"] == reference.IMAGE).long()
  try:
    with torch.no_grad():
      last = hf(**kw, output_hidden_states=True).hidden_states[-1]
      normed = text.norm(seen[-1])
  finally:
    hook.remove()
  np.testing.assert_allclose(last.numpy(), normed.numpy(), atol=1e-6, rtol=0)
  assert np.abs(last.numpy() - seen[-1].numpy()).max() > 1e-2


@pytest.mark.parametrize("readout", ["pre_token", "emb"])
def test_embedding_at_readout_equals_trace_jax(exported, hf_out, readout):
  ids = jnp.asarray(exported.batch["input_ids"])
  idx = np.asarray(readout_index(ids, readout, EMB, -1))
  assert readout != "pre_token" or (idx == exported.batch["attention_mask"].sum(1) - 2).all()
  rows = np.arange(len(idx))
  want = l2(exported.hidden[rows, idx])  # trace_jax's embedding (train/step.py's readout).
  got = l2(hf_out[2][rows, idx])
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)


def test_merge_is_real_and_only_touches_adapted_weights(exported):
  src, out = read_tensors(exported.src), read_tensors(exported.out)
  assert sorted(src) == sorted(out)
  adapted = {f"model.layers.{i}.{HF_PROJ[n]}.weight" for i in range(2) for n in TARGETS}
  assert adapted <= set(src)
  for key, want in src.items():
    if key in adapted:
      assert np.abs(out[key] - want).max() > 1e-3, f"{key} did not change"
    else:
      np.testing.assert_array_equal(out[key], want, err_msg=key)


def test_merged_kernel_is_base_plus_scaled_product(exported):
  """q_proj of layer 1: W' = W + (alpha / r) * (A . B), in torch's [out, in] layout."""
  q = exported.model.decoder.layers.q
  a, b = np.asarray(q.lora_a[...])[1], np.asarray(q.lora_b[...])[1]  # [D, r], [r, N, H]
  delta = q.scale * (a @ b.reshape(b.shape[0], -1))  # [D, N*H]
  key = "model.layers.1.self_attn.q_proj.weight"
  got = read_tensors(exported.out)[key] - read_tensors(exported.src)[key]
  np.testing.assert_allclose(got, delta.T, atol=1e-6, rtol=0)


def test_export_differs_from_the_base_model(exported, hf_out):
  base = reference.hf_model(CASE)
  _, base_hidden = reference.hf_forward(base, exported.batch)
  valid = exported.batch["attention_mask"].astype(bool)
  assert np.abs(base_hidden[valid] - hf_out[2][valid]).max() > 1e-2


def test_export_leaves_the_callers_model_unchanged(exported):
  for name in TARGETS:
    assert isinstance(getattr(exported.model.decoder.layers, name), LoRADense), name
  kw = {k: jnp.asarray(v) for k, v in exported.batch.items()}
  again = np.asarray(exported.model(**kw, return_logits=False).hidden_states)
  np.testing.assert_array_equal(again, exported.hidden)


def test_readme_and_embedding_file(exported):
  with open(os.path.join(exported.out, export_lib.EMBEDDING_FILE)) as f:
    info = json.load(f)
  assert info["readout"] == "pre_token" and info["normalize"] == "l2"
  assert info["tokenizer"] is None and info["emb_token_id"] is None
  with open(os.path.join(exported.out, export_lib.README_FILE)) as f:
    text = f.read()
  for needle in ("hidden_states[-1]", "output_hidden_states=True", EMB_TOKEN, "pos = emb - 1",
                 "normalize", "No tokenizer was exported", prompts.CANDIDATE_RULE):
    assert needle in text, needle


def test_readouts_match_the_training_step():
  assert tuple(export_lib.READOUTS) == READOUTS


def test_bad_arguments_are_named(exported, tmp_path):
  with pytest.raises(ValueError, match="readout='last'"):
    export_lib.export(exported.model, str(tmp_path / "a"), readout="last")
  with pytest.raises(ValueError, match="eor_token_id"):
    export_lib.export(exported.model, str(tmp_path / "b"), readout="end_of_reasoning")
  tok = HFTokenizer(qwen_like_tokenizer())  # More ids than the model's 300 rows.
  with pytest.raises(ValueError, match="vocabulary has only 300 rows"):
    export_lib.export(exported.model, str(tmp_path / "c"), tokenizer=tok)
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "c")


# The tokenizer round trip, and the README's code run against the export.


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
  """(trace_jax LoRA model whose vocab is the tiny tokenizer's + `<|emb|>`, tokenizer, export)."""
  root = tmp_path_factory.mktemp("export_tok")
  src = str(root / "src")
  tok = qwen_like_tokenizer()
  hf = reference.hf_model(dataclasses.replace(CASE, grids=()))
  hf.resize_token_embeddings(tok.get_vocab_size(with_added_tokens=True), mean_resizing=False)
  for name in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
    special = {"image_token_id": "<|image_pad|>", "vision_start_token_id": "<|vision_start|>",
               "vision_end_token_id": "<|vision_end|>"}[name]
    setattr(hf.config, name, tok.token_to_id(special))
  hf.save_pretrained(src)
  write_hf_dir(src, tok, "PreTrainedTokenizerFast")
  ours = HFTokenizer.from_dir(src)
  model = lora_model(src, seed=3)
  model = add_token_rows(model, ours.added_ids, ours.num_base_tokens)
  out = export_lib.export(model, str(root / "out"), tokenizer=ours, dtype="float32")
  return model, ours, out


def test_auto_tokenizer_maps_emb_to_the_same_id(with_tokenizer):
  _, ours, out = with_tokenizer
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert ours.added_ids == [ours.emb_id]
  assert hf_tok.convert_tokens_to_ids(EMB_TOKEN) == ours.emb_id
  enc = prompts.encode_candidate(ours, "a red circle", 0)
  text = export_lib.prompt_text(True, False).format(image="", text="a red circle") + EMB_TOKEN
  assert hf_tok(text, add_special_tokens=False).input_ids == list(enc.ids)


def readme_code(out: str) -> str:
  with open(os.path.join(out, export_lib.README_FILE)) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  assert len(blocks) == 1
  return blocks[0].replace('OUT = "path/to/this/directory"', f"OUT = {out!r}")


def test_readme_code_reproduces_trace_jax_embeddings(with_tokenizer):
  model, ours, out = with_tokenizer
  scope: dict = {}
  exec(readme_code(out), scope)  # noqa: S102  (the README's own snippet, on the export)
  for candidate, text in ((True, "a blue star above the red square"), (False, "find a circle")):
    enc = (prompts.encode_candidate(ours, text, 0) if candidate
           else prompts.encode_query(ours, text, 0))
    ids = jnp.asarray([enc.ids])
    h = np.asarray(model(ids, jnp.ones_like(ids), return_logits=False).hidden_states)
    want = l2(h[0, int(readout_index(ids, "pre_token", ours.emb_id, -1)[0])])
    got = (scope["embed_candidate"](text) if candidate
           else scope["embed_query"](text, reason=False)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_sentencepiece_tokenizer_and_processor_files_are_written(exported, tmp_path):
  texts = [prompts.SYSTEM, prompts.CANDIDATE_RULE, "a red circle", "system\nuser\nassistant\n"]
  tok = SentencePieceTokenizer.train(texts * 4, str(tmp_path / "sp" / "tok"), 300,
                                     user_symbols=prompts.required_tokens())
  base = tmp_path / "base"
  base.mkdir()
  (base / "preprocessor_config.json").write_text('{"min_pixels": 3136}')
  out = export_lib.export(exported.model, str(tmp_path / "out"), tokenizer=tok,
                          processor_dir=str(base))
  with open(os.path.join(out, "preprocessor_config.json")) as f:
    assert json.load(f) == {"min_pixels": 3136}  # The base model's processor files come along.
  again = SentencePieceTokenizer.from_file(os.path.join(out, export_lib.SENTENCEPIECE_FILE))
  assert again.emb_id == tok.emb_id and again.encode("a red circle") == tok.encode("a red circle")
  with open(os.path.join(out, export_lib.README_FILE)) as f:
    assert "not** a transformers tokenizer" in f.read()
  with open(os.path.join(out, export_lib.EMBEDDING_FILE)) as f:
    assert json.load(f)["emb_token_id"] == tok.emb_id


def greedy_embedding(model, ours, prompt, steps=3):
  """trace_jax's greedy decode (one full forward per token, `steps` tokens at most or
  `<|emb|>`) and the pre-token embedding; asserts that something was written."""
  ids = list(prompt)
  for _ in range(steps):
    logits = np.asarray(model(jnp.asarray([ids])).logits)[0, -1]
    if int(logits.argmax()) == ours.emb_id:
      break
    ids.append(int(logits.argmax()))
  assert len(ids) > len(prompt), "this seed's model answers <|emb|> at once: nothing reasoned"
  ids = jnp.asarray([ids + [ours.emb_id]])
  h = np.asarray(model(ids, return_logits=False).hidden_states)
  return l2(h[0, int(readout_index(ids, "pre_token", ours.emb_id, -1)[0])])


def test_readme_code_reasoning_query_reads_the_last_generated_token(with_tokenizer):
  """Greedy reasoning in transformers ends where trace_jax's greedy decode ends (3 tokens at most
  or `<|emb|>`); the embedding is the state just before `<|emb|>`."""
  model, ours, out = with_tokenizer
  scope: dict = {}
  exec(readme_code(out), scope)  # noqa: S102
  prompt = list(prompts.encode_query(ours, "find a circle", 0).ids[:-1])  # No target.
  want = greedy_embedding(model, ours, prompt)
  got = scope["embed_query"]("find a circle", reason=True, max_new_tokens=3).numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_readme_code_for_candidate_side_reasoning(with_tokenizer, tmp_path):
  """An export with `cand_reasoning`: the README's candidates use the reasoning candidate prompt
  and generate before their embedding, as trace_jax's encoder does."""
  model, ours, _ = with_tokenizer
  out = export_lib.export(model, str(tmp_path / "out"), tokenizer=ours, dtype="float32",
                          cand_reasoning=True)
  with open(os.path.join(out, export_lib.README_FILE)) as f:
    assert prompts.CANDIDATE_REASON_RULE in f.read()
  scope: dict = {}
  exec(readme_code(out), scope)  # noqa: S102
  enc = prompts.encode_candidate(ours, "a red circle", 0, may_reason=True)
  want = greedy_embedding(model, ours, enc.ids[:enc.prompt_len])
  got = scope["embed_candidate"]("a red circle", max_new_tokens=3).numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
