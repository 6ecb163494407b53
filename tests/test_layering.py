"""The packages import only downward: model < data < generate < {train, infer} < {eval, teach}
< tools.

A lower layer that reaches up (the pipeline importing the train step, the model importing the
tokenizer) ties pieces that should stand alone; shared pieces live low enough for both sides
(`model/readout.py`, `data/batch.py`). Checked on the source, imports inside functions included.
"""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "trace_jax")
# Package -> the trace_jax packages it must not import.
FORBIDDEN = {
  "model": {"data", "generate", "train", "infer", "eval", "tools"},
  "data": {"generate", "train", "infer", "eval", "tools"},
  "generate": {"data", "train", "infer", "eval", "tools"},
  "train": {"generate", "infer", "eval", "tools"},
  "infer": {"train", "eval", "tools"},
  "eval": {"tools"},
  "teach": {"infer", "eval", "tools"},
}


def _imported_packages(path: str) -> set[str]:
  """trace_jax sub-packages imported anywhere in a source file."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    elif isinstance(node, ast.Import):
      names += [a.name for a in node.names]
  return {n.split(".")[1] for n in names if n.startswith("trace_jax.") and n.count(".") >= 1}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_downward(package):
  bad = []
  for name in sorted(os.listdir(os.path.join(PACKAGE, package))):
    if name.endswith(".py"):
      reached = _imported_packages(os.path.join(PACKAGE, package, name)) & FORBIDDEN[package]
      bad += [f"{package}/{name} imports trace_jax.{p}" for p in sorted(reached)]
  assert not bad, "\n".join(bad)
