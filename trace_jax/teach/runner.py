"""The order of the teacher's phases for `tools/teach`: which queries (the selection and the
seeded `max_queries` sample), which phases run, when a model is loaded (only when a phase needs
one: `--phase=merge` loads none) and the barriers between phases. The phases themselves are in
`phases.py`; this module parses no flags."""

from __future__ import annotations

from typing import Sequence

import jax

from trace_jax.teach import attempts, phases
from trace_jax.teach.items import load_items, sample_items

PHASES = ("assess", "generate", "verify", "merge", "all")


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def run(config, phase: str, teacher_path: str | None, verifier_path: str | None, root: str,
        out_dir: str, datasets: Sequence[str] = ()) -> dict | None:
  """Runs `phase` ("all": assess, generate, verify, then merge) and returns the merge report
  (None in a process other than 0, or when no merge ran).

  Raises:
    ValueError: an unknown phase, or a phase that needs a teacher without `teacher_path`.
  """
  if phase not in PHASES:
    raise ValueError(f"--phase={phase!r}; expected one of {PHASES}")
  items = sample_items(load_items(root, config.files, datasets), config.max_queries, config.seed)
  teacher = None

  def the_teacher():
    nonlocal teacher
    if teacher is None:
      if not teacher_path:
        raise ValueError(f"--phase={phase} needs --teacher")
      from trace_jax.teach.loading import load_teacher  # Only when a model is needed.
      teacher = load_teacher(teacher_path, config, root)
    return teacher

  if phase in ("assess", "all"):
    phases.assess(config, the_teacher() if config.assess.mode == "teacher" else None, items,
                  out_dir)
    _barrier("assess")
  verifier = None
  # "all" runs a round per attempt: generate what needs an attempt, verify it (rejected outputs
  # get their next attempt in the next round; `attempts.py`). A single phase runs one round.
  for k in range(attempts.max_attempts(config) if phase == "all" else 1):
    if phase in ("generate", "all"):
      phases.generate(config, the_teacher(), items, out_dir)
      _barrier(f"generate{k}")
    if phase in ("verify", "all"):
      if verifier is None and verifier_path:
        from trace_jax.teach.loading import load_teacher
        verifier = load_teacher(verifier_path, config, root)
      phases.verify(config, verifier or the_teacher(), items, out_dir)
      _barrier(f"verify{k}")
  if phase in ("merge", "all") and jax.process_index() == 0:
    return phases.merge(items, out_dir, config.min_confidence)
  return None
