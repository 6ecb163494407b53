"""Drawing the synthetic world's queries and pools: which scenes, questions and edits, from seeded
random streams, and which split every scene belongs to. The rules and the teacher's text are in
`trace_jax.data.synthetic_teacher`; rendering and the M-BEIR files in `trace_jax.data.synthetic`.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Mapping, Sequence

from trace_jax.data import synthetic_teacher as rules


@dataclasses.dataclass(frozen=True)
class WorldSpec:
  """How queries are drawn (the vocabulary and rules are fixed in `synthetic_teacher`)."""
  # Relative weights of scenes with 1, 2, ... objects; the length is the most objects in a scene.
  object_counts: tuple[float, ...] = (1.0, 3.0)
  # Share of task-7 edits with two steps (DEMO_NOTES: where writing the reasoning pays).
  two_step_fraction: float = 0.5
  # Share of two-step edits whose second step edits what the first produced ("... move it ...").
  same_object_fraction: float = 0.5
  # Share of relational questions on scenes that allow one (DEMO_NOTES: where reasoning pays).
  relational_fraction: float = 0.7
  # Random distractor scenes added to the task 0/3 pools, per query.
  distractors_per_query: float = 1.0
  # Share of all scenes reserved for the test split: a test query shows and retrieves only these,
  # a train query of any task never does (held out by a seeded draw per scene, so both splits
  # keep one-object scenes: a test split drawn first would take nearly all 108 of them).
  test_scene_fraction: float = 0.3

  def __post_init__(self):
    if not 1 <= len(self.object_counts) <= len(rules.SHAPES) or min(self.object_counts) < 0:
      raise ValueError(f"object_counts needs 1-{len(rules.SHAPES)} weights >= 0")
    if not 0 < self.test_scene_fraction < 1:
      raise ValueError(f"test_scene_fraction must be in (0, 1), got {self.test_scene_fraction}")


@dataclasses.dataclass(frozen=True)
class DrawnQuery:
  """A drawn query before ids are given.

  Attributes:
    image: the query image's scene (tasks 3, 6, 7).
    text: the caption, question or edit (tasks 0, 6, 7).
    positive: the target scene (its image for tasks 0/7, its caption for task 3) or, for task 6,
      the answer string.
    teacher: the teacher output (tasks 6, 7) or None.
    kind: question kind or "+"-joined edit ops, counted in the summary.
  """
  task: int
  image: rules.Scene | None
  text: str | None
  positive: rules.Scene | str
  teacher: str | None
  kind: str


def _sample_scene(rng: random.Random, spec: WorldSpec) -> rules.Scene:
  k = rng.choices(range(1, len(spec.object_counts) + 1), weights=spec.object_counts)[0]
  shapes = rng.sample(rules.SHAPES, k)
  cells = rng.sample(range(len(rules.POSITIONS)), k)
  return rules.make_scene(
    [rules.Obj(c, rng.choice(rules.COLOURS), s) for c, s in zip(cells, shapes)])


def _pick_edit(rng: random.Random, options: dict[str, list[rules.Edit]]) -> rules.Edit:
  """An op uniformly among those available, then one of its edits: ops stay balanced."""
  return rng.choice(options[rng.choice(sorted(options))])


def _sample_edits(rng: random.Random, scene: rules.Scene, spec: WorldSpec) -> list[rules.Edit]:
  max_objects = len(spec.object_counts)
  first = _pick_edit(rng, rules.valid_edits(scene, max_objects))
  if rng.random() >= spec.two_step_fraction:
    return [first]
  middle, produced = rules.apply_edit(scene, first)
  options = rules.valid_edits(middle, max_objects)
  same = {op: [e for e in es if e.target == produced] for op, es in options.items()
          if rules.can_follow_on_same_object(first, op)}
  other = {op: [e for e in es if e.target is None or e.target != produced]
           for op, es in options.items()}
  same, other = ({op: es for op, es in d.items() if es} for d in (same, other))
  use_same = same and (not other or rng.random() < spec.same_object_fraction)
  return [first, _pick_edit(rng, same if use_same else other)]


def _sample_question(rng: random.Random, scene: rules.Scene, spec: WorldSpec) -> rules.Question:
  options = rules.valid_questions(scene)
  relational = [k for k in rules.RELATIONAL_KINDS if k in options]
  use_relational = relational and rng.random() < spec.relational_fraction
  kind = rng.choice(relational if use_relational else list(rules.SIMPLE_KINDS))
  questions = options[kind]
  if kind == "yes_no":  # balance yes and no
    want = rng.choice((rules.YES, rules.NO))
    questions = [q for q in questions if rules.answer(q) == want] or questions
  return rng.choice(questions)


def _draw_query(task: int, rng: random.Random, spec: WorldSpec) -> DrawnQuery:
  """One query of `task`; for tasks 7 the edit is redrawn until the target differs."""
  scene = _sample_scene(rng, spec)
  if task == 0:
    return DrawnQuery(0, None, rules.caption(scene), scene, None, "caption")
  if task == 3:
    return DrawnQuery(3, scene, None, scene, None, "caption")
  if task == 6:
    q = _sample_question(rng, scene, spec)
    return DrawnQuery(6, scene, rules.question_text(q), rules.answer(q),
                      rules.teach_question(scene, q), q.kind)
  while True:
    edits = _sample_edits(rng, scene, spec)
    teacher, target = rules.teach_edit(scene, edits)
    if target != scene:
      return DrawnQuery(7, scene, rules.edit_text(edits), target, teacher,
                        "+".join(e.op for e in edits))


def _scenes(q: DrawnQuery) -> set[rules.Scene]:
  """The scenes a query shows or retrieves: its image and its positive (tasks 0, 3, 7)."""
  return {s for s in (q.image, q.positive) if isinstance(s, rules.Scene)}


@dataclasses.dataclass(frozen=True)
class SceneSplit:
  """Which split a scene belongs to: a seeded coin per scene (`WorldSpec.test_scene_fraction`)."""
  seed: int
  test_fraction: float

  def __call__(self, scene: rules.Scene) -> str:
    coin = random.Random(f"{self.seed}/held_out/{rules.scene_name(scene)}").random()
    return "test" if coin < self.test_fraction else "train"


def _draw_task(task: int, n: int, rng: random.Random, spec: WorldSpec, *, split: str,
               scene_split: SceneSplit) -> list[DrawnQuery]:
  """`n` queries of `task` whose scenes all belong to `split`; test queries all different."""
  out, seen, tries = [], set(), 0
  while len(out) < n:
    tries += 1
    if tries > 200 * n + 1000:
      raise ValueError(f"could not draw {n} {split} queries of task {task}; lower the count")
    q = _draw_query(task, rng, spec)
    if any(scene_split(s) != split for s in _scenes(q)):
      continue
    if split == "test" and (q.task, q.image, q.text) in seen:
      continue
    seen.add((q.task, q.image, q.text))
    out.append(q)
  return out


def draw_pool(task: int, queries: Sequence[DrawnQuery], rng: random.Random, spec: WorldSpec,
              split: str, scene_split: SceneSplit) -> list[rules.Scene | str]:
  """The local pool: scenes (images; captions for task 3) sorted by name, or every answer.
  Random distractors are scenes of the pool's own split."""
  if task == 6:
    return list(rules.ANSWERS)
  items = {q.positive for q in queries}
  if task == 7:
    items |= {q.image for q in queries}
  else:
    for _ in range(round(spec.distractors_per_query * len(queries))):
      scene = _sample_scene(rng, spec)
      while scene_split(scene) != split:
        scene = _sample_scene(rng, spec)
      items.add(scene)
  return sorted(items, key=rules.scene_name)


def task_counts(n_train: int, task_mix: Mapping[int, float]) -> dict[int, int]:
  """Splits `n_train` over the tasks by weight (largest remainder, ties to the lower task)."""
  total = sum(task_mix.values())
  exact = {t: n_train * w / total for t, w in task_mix.items()}
  counts = {t: int(v) for t, v in exact.items()}
  for t in sorted(exact, key=lambda t: (counts[t] - exact[t], t))[:n_train - sum(counts.values())]:
    counts[t] += 1
  return counts


def draw_splits(sizes: Mapping[str, Mapping[int, int]], seed: int, spec: WorldSpec,
                scene_split: SceneSplit) -> dict[str, dict[int, list[DrawnQuery]]]:
  """Queries per split and task (splits in the order of `sizes`), each from its own random
  stream; a query's scenes all belong to its split (`scene_split`), so no test scene is in any
  train query of any task."""
  return {split: {t: _draw_task(t, n, random.Random(f"{seed}/{split}/task{t}"), spec,
                                split=split, scene_split=scene_split)
                  for t, n in per_task.items()} for split, per_task in sizes.items()}
