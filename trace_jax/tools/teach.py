"""`python -m trace_jax.tools.teach`: M-BEIR + an open Qwen2.5-VL -> raw M-BEIR-CoT.

    python -m trace_jax.tools.teach --config=configs/teach.py --teacher=DIR --mbeir_root=DIR
        --out=DIR [--phase=assess|generate|verify|all] [--datasets=cirr,fashioniq,...]
        [--verifier=DIR] [--num_processes=N --process_id=I --coordinator_address=HOST:PORT]

Runs the paper's three phases (`trace_jax/teach/phases.py`) and writes OUT/mbeir_cot_raw.jsonl,
the file `python -m trace_jax.tools.build_cot` filters into the training file, and
OUT/teach_report.json. `--teacher` (and `--verifier`, default the teacher): a Hugging Face
directory or a trace_jax run directory. Killed and run again, it resumes; several processes
split the queries, each writing its own shards.
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
_PHASE = flags.DEFINE_enum("phase", "all", ["assess", "generate", "verify", "all"],
                           "Which phase to run (all: the three, then the merge).")
_DATASETS = flags.DEFINE_list("datasets", [], "Only these datasets (e.g. cirr,fashioniq).")


def main(argv):
  del argv
  config = _CONFIG.value
  devices.split_cpu(config.cpu_devices)
  processes.join()
  import jax  # After XLA_FLAGS.

  from trace_jax.teach import phases
  from trace_jax.teach.items import load_items
  from trace_jax.teach.loading import load_teacher
  items = load_items(_ROOT.value, config.files, _DATASETS.value)
  items = items[:config.max_queries] if config.max_queries else items
  phase, teacher = _PHASE.value, None

  def the_teacher():
    nonlocal teacher
    teacher = teacher or load_teacher(_TEACHER.value, config, _ROOT.value)
    return teacher

  def barrier(name):
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(name)

  if phase in ("assess", "all"):
    phases.assess(config, the_teacher() if config.assess.mode == "teacher" else None, items,
                  _OUT.value)
    barrier("assess")
  if phase in ("generate", "all"):
    phases.generate(config, the_teacher(), items, _OUT.value)
    barrier("generate")
  if phase in ("verify", "all"):
    verifier = (load_teacher(_VERIFIER.value, config, _ROOT.value) if _VERIFIER.value
                else the_teacher())
    phases.verify(config, verifier, items, _OUT.value)
    barrier("verify")
  if phase == "all" and jax.process_index() == 0:
    print(json.dumps(phases.merge(items, _OUT.value)))


if __name__ == "__main__":
  devices.huge_page_malloc()
  flags.mark_flags_as_required(["teacher", "mbeir_root", "out"])
  app.run(main)
