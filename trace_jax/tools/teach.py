"""`python -m trace_jax.tools.teach`: M-BEIR + an open Qwen2.5-VL -> raw M-BEIR-CoT.

    python -m trace_jax.tools.teach --config=configs/teach.py --teacher=DIR --mbeir_root=DIR
        --out=DIR [--phase=assess|generate|verify|merge|all] [--datasets=cirr,fashioniq,...]
        [--verifier=DIR] [--num_processes=N --process_id=I --coordinator_address=HOST:PORT]

Runs the paper's three phases (`trace_jax/teach/phases.py`, in the order of
`trace_jax/teach/runner.py`) and writes OUT/mbeir_cot_raw.jsonl, the file
`python -m trace_jax.tools.build_cot` filters into the training file, and OUT/teach_report.json.
`--teacher` (and `--verifier`, default the teacher): a Hugging Face directory or a trace_jax run
directory. `--phase=merge` only merges what earlier phase-by-phase runs wrote (no model is
loaded, `--teacher` may be left out). Killed and run again, it resumes; several processes split
the queries, each writing its own shards.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from trace_jax import devices, processes

_CONFIG = config_flags.DEFINE_config_file("config", "configs/teach.py", "Teacher config.")
_TEACHER = flags.DEFINE_string("teacher", None, "Hugging Face directory or trace_jax run.")
_VERIFIER = flags.DEFINE_string("verifier", None, "The verifier (default: the teacher).")
_ROOT = flags.DEFINE_string("mbeir_root", None, "M-BEIR root (or the demo world).")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_PHASE = flags.DEFINE_enum("phase", "all", ["assess", "generate", "verify", "merge", "all"],
                           "Which phase to run (all: the three, then the merge; merge: only "
                           "the merge, no model loaded).")
_DATASETS = flags.DEFINE_list("datasets", [], "Only these datasets (e.g. cirr,fashioniq).")


def main(argv):
  del argv
  config = _CONFIG.value
  devices.split_cpu(config.cpu_devices)
  processes.join()
  from trace_jax.teach import phases, runner  # After XLA_FLAGS.
  report = runner.run(config, _PHASE.value, _TEACHER.value, _VERIFIER.value, _ROOT.value,
                      _OUT.value, _DATASETS.value)
  if report is not None:
    print(json.dumps(phases.report_summary(report)))


if __name__ == "__main__":
  devices.huge_page_malloc()
  flags.mark_flags_as_required(["mbeir_root", "out"])
  app.run(main)
