"""Fine-tuning from a Hugging Face checkpoint: the loop starts from its weights, adds `<|emb|>`
rows for the tokenizer and trains LoRA adapters, leaving the base weights frozen; the trained
model then loads for inference without the checkpoint it started from."""

import shutil

import numpy as np
import torch
import transformers
from flax import nnx

from configs import demo
from tests.data import tokenizer_fixture
from tests.model import reference
from tests.model.reference import Case
from trace_jax.data.tokenizer import HFTokenizer
from trace_jax.model import token_rows
from trace_jax.model.hf_io import load_hf
from trace_jax.model.lora import merge_lora
from trace_jax.train import checkpoint, loop, trained


def test_loop_fine_tunes_a_hugging_face_checkpoint(tmp_path):
  hf_dir = str(tmp_path / "hf")
  tok = tokenizer_fixture.qwen_like_tokenizer()
  tokenizer_fixture.write_hf_dir(hf_dir, tok)
  tok_dir = tokenizer_fixture.write_hf_dir(str(tmp_path / "tok"), tok)  # Outlives hf_dir.
  case = Case("init", "qwen2_5_vl", kv_heads=2, tie=False, grids=())
  torch.manual_seed(0)
  cfg = reference.hf_config(case, vocab=tok.get_vocab_size() + 8)  # Padded past the tokenizer.
  transformers.Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(hf_dir)

  config = demo.get_config("steps=2,backbone=none")
  config.ckpt.init_from = hf_dir
  config.data.tokenizer = f"{tok_dir}/tokenizer.json"
  config.data.root = str(tmp_path / "world")
  config.data.world_train, config.data.world_test = 48, 8
  config.data.global_batch = 16
  config.data.query_len, config.data.cand_len = 512, 256  # Byte-level BPE: long sequences.
  config.data.query_buckets, config.data.cand_buckets = (), ()
  config.lora.rank, config.lora.alpha = 4, 8.0
  config.optim.train_vision = False
  config.log.every_steps = 1
  workdir = str(tmp_path / "run")
  loop.run(config, workdir)

  s = loop.build(config)
  state, step = checkpoint.restore_state(workdir, s.state)
  assert step == 2
  model = nnx.merge(s.graphdef, state.params["model"], state.frozen)
  base, _ = load_hf(hf_dir, dtype="float32")
  emb_id = HFTokenizer.from_dir(hf_dir).emb_id
  assert model.cfg.text.vocab_size == max(cfg.text_config.vocab_size, emb_id + 1)
  np.testing.assert_array_equal(np.asarray(model.decoder.layers.q.base.kernel[...]),
                                np.asarray(base.decoder.layers.q.kernel[...]))
  assert np.abs(np.asarray(model.decoder.layers.q.lora_b[...])).max() > 0  # Adapters trained.

  ids = np.array([[3, 5, emb_id, 7]], np.int32)
  logits = np.asarray(model(ids).logits)
  merged = token_rows.merge(merge_lora(model))  # What the training setup's weights fold into.

  # For inference the run's model comes merged: the same function, no adapters left. Only the
  # weights are read: the directory it started from is gone, and nothing needs it.
  shutil.rmtree(hf_dir)
  inference = trained.load_model(config, workdir, None)[0]
  assert not list(nnx.to_flat_state(nnx.state(inference, nnx.LoRAParam)))
  assert inference.token_rows is None
  expected = dict(nnx.to_flat_state(nnx.state(merged)))
  got = dict(nnx.to_flat_state(nnx.state(inference)))
  assert set(got) == set(expected)
  for path, var in got.items():  # Bit for bit the training setup's weights, float32.
    assert var.get_value().dtype == expected[path].get_value().dtype, path
    np.testing.assert_array_equal(np.asarray(var.get_value()),
                                  np.asarray(expected[path].get_value()), err_msg=str(path))
  np.testing.assert_allclose(np.asarray(inference(ids).logits), logits, rtol=1e-4, atol=1e-4)
