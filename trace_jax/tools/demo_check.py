"""`python -m trace_jax.tools.demo_check --trace=runs/demo[,runs/demo_seed1]
--direct=runs/demo_direct[,runs/demo_direct_seed1]`: the demo's claims (`eval/demo_criteria.py`)
from the runs' WORKDIR/eval/results.json, one run of each arm per seed (means over seeds); prints
each claim with its number and exits 1 when one fails."""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from trace_jax.eval import demo_criteria

_TRACE = flags.DEFINE_list("trace", ["runs/demo"],
                           "Workdirs of the TRACE demo runs (one per seed).")
_DIRECT = flags.DEFINE_list("direct", ["runs/demo_direct"],
                            "Workdirs of `configs/demo.py:ablation=direct` (one per seed).")


def _results(workdir: str) -> dict:
  path = os.path.join(workdir, "eval", "results.json")
  if not os.path.isfile(path):
    raise SystemExit(f"error: {path} not found; run trace_jax.main on that workdir first")
  with open(path) as f:
    return json.load(f)


def main(argv):
  del argv
  if len(_TRACE.value) != len(_DIRECT.value):
    raise SystemExit(f"error: {len(_TRACE.value)} TRACE runs but {len(_DIRECT.value)} "
                     "direct-only runs; give one of each per seed")
  checks = demo_criteria.check([_results(w) for w in _TRACE.value],
                               [_results(w) for w in _DIRECT.value])
  print(f"{len(_TRACE.value)} seed(s): {', '.join(_TRACE.value)} against "
        f"{', '.join(_DIRECT.value)}")
  for c in checks:
    print(c.line())
  sys.exit(0 if all(c.ok for c in checks) else 1)


if __name__ == "__main__":
  app.run(main)
