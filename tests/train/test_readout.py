"""Where the embedding is read and which positions carry the LM loss."""

import numpy as np
import pytest

from configs import common
from tests.data import pipeline_fixture as fx
from trace_jax.train import setup
from trace_jax.model.readout import readout_index
from trace_jax.train.step import split_micro, target_slots

EMB, EOR = 9, 8


def test_readout_modes():
  ids = np.array([[1, 2, 3, EMB, 0, 0],       # direct: <|emb|> right after the prompt
                  [1, 2, 4, EOR, 5, EMB],     # reasoning with an end-of-reasoning marker
                  [1, 2, 4, 5, EMB, 0]])      # reasoning without the marker
  np.testing.assert_array_equal(readout_index(ids, "pre_token", EMB, EOR), [2, 4, 3])
  np.testing.assert_array_equal(readout_index(ids, "emb", EMB, EOR), [3, 5, 4])
  np.testing.assert_array_equal(readout_index(ids, "end_of_reasoning", EMB, EOR), [2, 3, 3])


def test_target_slots_shift_and_keep_the_tail():
  ids = np.array([[1, 2, 3, 4, EMB], [1, 2, EMB, 0, 0]])
  target = np.array([[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]])
  pos, tgt, w, dropped = target_slots(ids, target, 2)
  # Token t is predicted at position t - 1; row 0 has 3 targets, 2 slots: the first is dropped
  # (counted) and the answer's last token and <|emb|> keep their slots.
  np.testing.assert_array_equal(pos[0], [2, 3])
  np.testing.assert_array_equal(tgt[0], [4, EMB])
  np.testing.assert_array_equal(w, [[1, 1], [1, 0]])
  np.testing.assert_array_equal(tgt[1][:1], [EMB])
  assert int(dropped) == 1


def test_target_slots_of_an_over_long_reasoning_keep_emb():
  """A 40-token target in 16 slots: the 16 supervised tokens are the last ones, <|emb|> last."""
  prompt, target_len, t = 7, 40, 50
  ids = np.zeros((1, t), np.int32)
  ids[0, :prompt + target_len] = np.arange(100, 100 + prompt + target_len)
  ids[0, prompt + target_len - 1] = EMB
  mask = np.zeros_like(ids)
  mask[0, prompt:prompt + target_len] = 1
  pos, tgt, w, dropped = target_slots(ids, mask, 16)
  assert int(dropped) == 24 and w.all()
  np.testing.assert_array_equal(tgt[0], ids[0, prompt + 24:prompt + target_len])
  np.testing.assert_array_equal(pos[0] + 1, np.arange(prompt + 24, prompt + target_len))


def test_split_micro_interleaves_rows():
  batch = {"query_ids": np.arange(8)[:, None] * np.ones((1, 3), int),
           "query_positions": np.zeros((3, 8, 3), int)}
  micro = split_micro(batch, 2)
  np.testing.assert_array_equal(micro["query_ids"][:, :, 0], [[0, 2, 4, 6], [1, 3, 5, 7]])
  assert micro["query_positions"].shape == (2, 3, 4, 3)


def test_step_config_takes_the_token_ids_from_the_tokenizer(tmp_path):
  tok = fx.tokenizer(str(tmp_path))  # Has <|emb|> but no end-of-reasoning marker.
  config = common.base_config()
  cfg = setup.step_config(config, tok)
  assert cfg.emb_token_id == tok.emb_id and cfg.eor_token_id == -1
  config.loss.readout = "end_of_reasoning"
  with pytest.raises(ValueError, match="data.reasoning_marker"):
    setup.step_config(config, tok)
  config.data.reasoning_marker = True
  with pytest.raises(KeyError):  # The tokenizer must have the marker as one token.
    setup.step_config(config, tok)


def test_lm_only_pretraining_refuses_what_needs_candidates(tmp_path):
  tok = fx.tokenizer(str(tmp_path))
  config = common.base_config()
  config.data.target, config.loss.lambda_ret = "lm", 0.0
  assert setup.step_config(config, tok).emb_token_id == -1
  for key, value in (("loss.lambda_ret", 1.0), ("optim.micro_batches", 2),
                     ("data.hard_negatives", "listed")):
    section, field = key.split(".")
    before = config[section][field]
    config[section][field] = value
    with pytest.raises(ValueError, match="trains the language model alone"):
      setup.step_config(config, tok)
    config[section][field] = before
