"""The demo's backbone: an LM-only pretraining run written as a Hugging Face directory with a
tokenizer that has no `<|emb|>`, built once and reused; fine-tuning starts from it the way it
starts from a released Qwen2.5-VL (`<|emb|>` appended, its row set to the mean and trained, LoRA
on the decoder, the vision tower frozen, the merger trained)."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from configs import demo
from trace_jax.data.tokenizer import SENTENCEPIECE_FILE, SentencePieceTokenizer
from trace_jax.eval import backbone_answers
from trace_jax.model.hf_io import load_hf
from trace_jax.train import backbone, loop
from trace_jax.train.state import is_trainable


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("demo")
  c = demo.get_config("steps=2,backbone_steps=4")
  c.data.root = str(tmp / "world")
  c.data.world_train, c.data.world_test = 320, 8
  c.data.global_batch = 8
  c.backbone.workdir = str(tmp / "backbone")
  c.backbone.hf_dir = str(tmp / "backbone" / "hf")
  c.backbone.config.data.global_batch = 8
  c.backbone.config.log.every_steps = 2
  return c


def test_backbone_is_built_once_then_reused(config):
  said = []
  out = backbone.ensure(config.backbone, said.append)
  assert out == config.backbone.hf_dir and "building" in said[0]
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", SENTENCEPIECE_FILE]
  assert not os.path.exists(f"{out}.partial")
  with open(os.path.join(config.backbone.workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert rows[-1]["step"] == 4 and rows[-1]["loss/contrastive"] == 0.0  # LM loss alone.
  tok = SentencePieceTokenizer.from_file(os.path.join(out, SENTENCEPIECE_FILE), add_emb=False)
  with pytest.raises(KeyError):
    tok.emb_id
  assert tok.vocab_size == 767
  mtime = os.path.getmtime(os.path.join(out, "model.safetensors"))
  assert backbone.ensure(config.backbone, said.append) == out
  assert "reusing" in said[-1] and os.path.getmtime(os.path.join(out, "model.safetensors")) == mtime


def test_fine_tuning_starts_from_the_backbone_like_a_released_checkpoint(config):
  backbone.ensure(config.backbone, lambda _: None)
  base = load_hf(config.backbone.hf_dir, dtype="float32")[0]
  s = loop.build(config)
  assert s.tok.added_ids == [767] and s.tok.emb_id == 767 and s.tok.num_base_tokens == 767
  model = nnx.merge(s.graphdef, s.state.params["model"], s.state.frozen)
  rows, trained = np.asarray(model.embed.value), np.asarray(base.embed.value)
  np.testing.assert_array_equal(rows[:767], trained[:767])
  np.testing.assert_allclose(rows[767], trained[:767].mean(axis=0), rtol=1e-6, atol=1e-7)
  keep = is_trainable(config.lora.rank, config.optim.train_vision)
  trainable = {"/".join(map(str, p)) for p, v in nnx.to_flat_state(nnx.state(model))
               if keep(p, v)}
  assert trainable and all("lora" in p or p.startswith(("visual/merger", "token_rows/"))
                           for p in trainable)
  assert "token_rows/embed" in trainable  # <|emb|>'s row trains over the frozen vocabulary.
  assert model.token_rows.ids == (767,)
  assert any(p.startswith("visual/merger") for p in trainable)
  assert not any(p.startswith("visual/blocks") for p in trainable)
  for name in ("q", "k", "v", "o", "gate", "up", "down"):
    assert any(f"/{name}/lora" in p for p in trainable), name


def test_backbone_answers_every_hard_task(config):
  """eval.backbone_answers (tools.demo_backbone) on the built backbone: the test queries as
  pretraining's chat turns, decoded greedily, one count per hard task."""
  backbone.ensure(config.backbone, lambda _: None)
  got = backbone_answers.answers(config.backbone.config, config.backbone.workdir, queries=4,
                                 max_new_tokens=8)
  assert sorted(got) == [6, 7]
  for counts in got.values():
    assert counts["queries"] == 4 and 0 <= counts["texts_right"] <= counts["answers_right"] <= 4
