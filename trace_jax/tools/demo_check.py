"""`python -m trace_jax.tools.demo_check --trace=runs/demo --direct=runs/demo_direct`: the demo's
four claims (`eval/demo_criteria.py`) from the two runs' WORKDIR/eval/results.json; exits 1 when
one fails."""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from trace_jax.eval import demo_criteria

_TRACE = flags.DEFINE_string("trace", "runs/demo", "Workdir of the TRACE demo run.")
_DIRECT = flags.DEFINE_string("direct", "runs/demo_direct",
                              "Workdir of `configs/demo.py:ablation=direct`.")


def _results(workdir: str) -> dict:
  path = os.path.join(workdir, "eval", "results.json")
  if not os.path.isfile(path):
    raise SystemExit(f"error: {path} not found; run trace_jax.main on that workdir first")
  with open(path) as f:
    return json.load(f)


def main(argv):
  del argv
  checks = demo_criteria.check(_results(_TRACE.value), _results(_DIRECT.value))
  for c in checks:
    print(c.line())
  sys.exit(0 if all(c.ok for c in checks) else 1)


if __name__ == "__main__":
  app.run(main)
