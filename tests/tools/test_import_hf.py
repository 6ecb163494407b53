"""`python -m trace_jax.tools.import_hf` on a tiny Hugging Face directory, run as a subprocess.

The directory holds a random Qwen2.5-VL checkpoint whose vocabulary is exactly the tiny tokenizer's
(`tests/data/tokenizer_fixture.py`), so `<|emb|>` lands one past the last row and the embedding and
`lm_head` grow by one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from tests.data.tokenizer_fixture import qwen_like_tokenizer, write_hf_dir
from tests.model import reference
from tests.model.reference import Case
from trace_jax.data.tokenizer import EMB_TOKEN, HFTokenizer
from trace_jax.model import params_io
from trace_jax.model.hf_io import load_hf
from trace_jax.model.vocab import add_token_rows

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASE = Case("v25", "qwen2_5_vl", kv_heads=2, tie=False, grids=())


def run_import(hf_dir: str, out: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run(
    [sys.executable, "-m", "trace_jax.tools.import_hf", f"--hf_dir={hf_dir}", f"--out={out}"],
    cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp("import") / "hf")
  tok = qwen_like_tokenizer()
  model = reference.hf_model(CASE)
  model.resize_token_embeddings(tok.get_vocab_size(with_added_tokens=True), mean_resizing=False)
  model.save_pretrained(path)
  return write_hf_dir(path, tok, "PreTrainedTokenizerFast")


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory) -> str:
  out = str(tmp_path_factory.mktemp("import") / "out")
  result = run_import(hf_dir, out)
  assert result.returncode == 0, result.stderr[-3000:]
  return out


def test_import_grows_vocab_and_writes_params_and_tokenizer(hf_dir, imported):
  tok = HFTokenizer.from_dir(hf_dir)
  want, _ = load_hf(hf_dir, dtype="float32", param_dtype="float32")
  vocab = want.cfg.text.vocab_size
  assert tok.added_ids == [vocab] and tok.num_base_tokens == vocab  # The fixture's premise.
  want = add_token_rows(want, tok.added_ids, tok.num_base_tokens)

  got = params_io.load_params(imported, mesh=None, dtype="float32")
  assert got.cfg == want.cfg and got.cfg.text.vocab_size == vocab + 1
  got_state = dict(nnx.to_flat_state(nnx.state(got, nnx.Param)))
  want_state = dict(nnx.to_flat_state(nnx.state(want, nnx.Param)))
  assert sorted(got_state) == sorted(want_state)
  for path, v in want_state.items():
    np.testing.assert_array_equal(np.asarray(got_state[path].get_value()),
                                  np.asarray(v.get_value()), err_msg="/".join(map(str, path)))

  saved = HFTokenizer.from_dir(imported)
  assert saved.added_ids == [] and saved.emb_id == vocab
  with open(os.path.join(imported, "tokenizer.json")) as f:
    assert EMB_TOKEN in {t["content"] for t in json.load(f)["added_tokens"]}
  with open(os.path.join(imported, "tokenizer_config.json")) as f:
    assert json.load(f)["added_tokens_decoder"][str(vocab)]["content"] == EMB_TOKEN


def test_import_refuses_to_overwrite(hf_dir, imported):
  with open(os.path.join(imported, params_io.CONFIG_FILE)) as f:
    config_before = f.read()
  result = run_import(hf_dir, imported)
  assert result.returncode != 0
  assert "refusing to overwrite" in result.stderr
  assert os.path.join(imported, "params") in result.stderr
  with open(os.path.join(imported, params_io.CONFIG_FILE)) as f:
    assert f.read() == config_before


def test_import_of_a_bad_hf_dir_fails_naming_it(tmp_path):
  missing = str(tmp_path / "no_such_model")
  result = run_import(missing, str(tmp_path / "out"))
  assert result.returncode != 0
  assert f"no config.json in {missing}" in result.stderr
  assert not os.path.exists(tmp_path / "out" / "params")
