"""Every `configs/*.py` loads the way `--config=FILE[:ARGS]` loads it and converts to a ModelConfig.

Also checks the `key=value` argument parser of `configs/common.py` and that a typo'd model field
fails in `model_config` instead of being silently ignored.
"""

import glob
import importlib
import os

import pytest
from absl import flags
from ml_collections import config_flags

from trace_jax.model import factory
from trace_jax.model.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(
  p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
  if os.path.basename(p) not in ("__init__.py", "common.py", "teach.py"))
NAMES = [os.path.splitext(os.path.basename(p))[0] for p in CONFIG_FILES]
RELEASED = ("qwen2_vl_2b", "qwen2_vl_7b", "qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen2_5_vl_72b")


def load_with_flags(spec: str, *overrides: str):
  """`--config=spec [--config.a.b=v ...]` parsed by ml_collections' config_flags, as main does."""
  argv = ["prog", f"--config={spec}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].", flag_values=fv,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def get_config(name: str, arg: str | None = None):
  module = importlib.import_module(f"configs.{name}")
  return module.get_config() if arg is None else module.get_config(arg)


def test_all_config_files_are_found():
  assert set(RELEASED) | {"demo"} <= set(NAMES), NAMES


@pytest.mark.parametrize("path", CONFIG_FILES, ids=NAMES)
def test_loads_and_converts(path):
  config = load_with_flags(path)
  cfg = factory.model_config(config)
  assert isinstance(cfg, ModelConfig)
  assert cfg.text.width == cfg.vision.out_width, "the merger must output the decoder width"
  # The same file imported as a module (what the tests and tools do) gives the same model.
  assert factory.model_config(get_config(os.path.basename(path)[:-3])) == cfg


@pytest.mark.parametrize("name", NAMES)
def test_dtype_argument(name):
  default = factory.model_config(get_config(name))
  other = "bfloat16" if default.dtype == "float32" else "float32"
  config = get_config(name, f"dtype={other}")
  assert config.model.dtype == other
  assert factory.model_config(config) == default.replace(dtype=other)
  # Through the flag, `FILE:ARGS` and a `--config.model.*` override.
  flagged = load_with_flags(f"{os.path.join(ROOT, 'configs', name)}.py:dtype={other}")
  assert factory.model_config(flagged).dtype == other
  flagged = load_with_flags(os.path.join(ROOT, "configs", f"{name}.py"),
                            f"--config.model.dtype={other}")
  assert factory.model_config(flagged).dtype == other


@pytest.mark.parametrize("name", RELEASED)
def test_released_arguments(name):
  config = get_config(name, "dtype=float32, param_dtype=bfloat16,remat=dots")
  cfg = factory.model_config(config)
  assert (cfg.dtype, cfg.param_dtype, cfg.remat) == ("float32", "bfloat16", "dots")
  assert factory.model_config(get_config(name, "")) == factory.model_config(get_config(name))


@pytest.mark.parametrize("name", NAMES)
def test_unknown_argument_raises_key_error(name):
  with pytest.raises(KeyError, match="dtpye"):
    get_config(name, "dtpye=float32")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arg", ["dtype", "dtype=float32,float32"])
def test_malformed_argument_raises_value_error(name, arg):
  with pytest.raises(ValueError, match="key=value"):
    get_config(name, arg)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("section", ["model", "model.text", "model.vision"])
def test_typo_in_model_field_raises(name, section):
  config = get_config(name)  # Not locked (config_flags locks, so the flag path fails earlier).
  node = config
  for part in section.split("."):
    node = getattr(node, part)
  node.widht = 7
  with pytest.raises(ValueError, match=rf"{section}\b.*widht"):
    factory.model_config(config)


def test_flag_override_of_unknown_field_fails():
  """config_flags locks the config: `--config.model.text.widht=...` does not parse."""
  with pytest.raises(AttributeError, match="widht"):
    load_with_flags(os.path.join(ROOT, "configs", "demo.py"), "--config.model.text.widht=7")


def test_invalid_value_raises():
  config = get_config("demo", "dtype=float64")
  with pytest.raises(ValueError, match="float64"):
    factory.model_config(config)


def test_target_caps_cover_what_the_cot_filter_admits():
  """The LM-loss slots and the encoder's reasoning cap default to the longest target the
  M-BEIR-CoT length rule keeps, so no admitted trace loses its end."""
  from configs import common
  from trace_jax.data import cot
  c = common.base_config()
  assert c.loss.max_target_tokens == c.eval.max_new_tokens == cot.MAX_TARGET_TOKENS


@pytest.mark.parametrize("arg", ["", "world=demo", "teacher=72b"])
def test_teach_config_loads(arg):
  """The teacher's config (not an experiment: no model section) through the flag, and its
  templates render every field a query gives."""
  path = os.path.join(ROOT, "configs", "teach.py")
  config = load_with_flags(f"{path}:{arg}" if arg else path)
  for template in list(config.templates.values()) + list(config.verify.templates.values()):
    text = template["body"].format(instruction="i", query="q", target="t", answer="a")
    assert "{" not in text and template["image"] in ("query", "target", "none")
  assert set(config.templates_for.values()) <= set(config.templates)
  assert set(config.verify.templates_for.values()) <= set(config.verify.templates)
  with pytest.raises(KeyError, match="wrold"):
    get_config("teach", "wrold=demo")
