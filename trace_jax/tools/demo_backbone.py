"""`python -m trace_jax.tools.demo_backbone --config=configs/demo.py:stage=backbone
--workdir=runs/demo_backbone [--queries=200]`: how well a demo backbone (an LM-only run, before
any retrieval training) reasons on the test split's hard tasks (6, 7).

Each test query is put to the run's newest checkpoint as the chat turn it was pretrained on and
answered greedily (`trace_jax/eval/backbone_answers.py`). Printed per task: how many answers end
with the teacher's answer, and how many equal the teacher's whole text (tags stripped).
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from trace_jax import devices

_CONFIG = config_flags.DEFINE_config_file("config", None, "The backbone's config[:args].")
_WORKDIR = flags.DEFINE_string("workdir", None, "The backbone run's directory.")
_QUERIES = flags.DEFINE_integer("queries", 200, "Test queries per task (the first N).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Longest answer written.")


def main(argv):
  del argv
  config = _CONFIG.value
  devices.split_cpu(config.cpu_devices)
  from trace_jax.eval import backbone_answers  # After XLA_FLAGS: it initialises JAX.
  result = backbone_answers.answers(config, _WORKDIR.value, _QUERIES.value, _MAX_NEW.value)
  for task, c in result.items():
    print(f"task {task}: answers right {c['answers_right']} / {c['queries']}, whole teacher "
          f"text {c['texts_right']} / {c['queries']}")
  print(json.dumps({str(k): v for k, v in result.items()}))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
