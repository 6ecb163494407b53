"""Rules of the synthetic shapes world and the rule-based teacher that narrates them.

A scene is 1-3 objects (distinct shapes, distinct cells, colours may repeat) on a 3x3 grid. This
module holds everything that is deterministic about that world: the vocabulary, the canonical
caption of a scene and its image name, the edits of task 7 and the questions of task 6 (which ones
are valid on a scene, their wording, their effect), and the teacher's
`<reasoning>...</reasoning><answer>...</answer>` text. It draws no random numbers, renders no images
and writes no files: sampling and the M-BEIR files live in `trace_jax.data.synthetic`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
# Cell k of the 3x3 grid is row k // 3, column k % 3, in reading order.
POSITIONS = ("top left", "top center", "top right", "middle left", "center", "middle right",
             "bottom left", "bottom center", "bottom right")
RELATIONS = ("left of", "right of", "above", "below")
YES, NO = "yes", "no"
# Every answer string of task 6, in the order of its candidate pool.
ANSWERS = (COLOURS + SHAPES + POSITIONS + tuple(f"{c} {s}" for c in COLOURS for s in SHAPES) +
           (YES, NO))
TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")

EDIT_OPS = ("recolour", "move", "reshape", "remove", "add")
# Ops whose step leaves the same object in the scene, so a second step may refer to it as "it".
_KEEPS_OBJECT = ("recolour", "move", "reshape")
SIMPLE_KINDS = ("colour_of", "shape_at", "where")
RELATIONAL_KINDS = ("rel_colour", "rel_shape", "rel_object", "yes_no")


@dataclasses.dataclass(frozen=True, order=True)
class Obj:
  """One object; ordering by cell first gives the canonical (reading) order of a scene."""
  cell: int
  colour: str
  shape: str

  @property
  def position(self) -> str:
    return POSITIONS[self.cell]

  def describe(self) -> str:
    """E.g. "red circle top left": terse, so that the CPU demo's sequences stay short."""
    return f"{self.colour} {self.shape} {self.position}"


@dataclasses.dataclass(frozen=True)
class Scene:
  """Objects sorted by cell; shapes and cells are distinct. Build with `make_scene`."""
  objects: tuple[Obj, ...]

  def __post_init__(self):
    if not self.objects:
      raise ValueError("a scene needs at least one object")
    if list(self.objects) != sorted(self.objects):
      raise ValueError("objects must be sorted by cell; use make_scene")
    if len({o.cell for o in self.objects}) != len(self.objects):
      raise ValueError(f"two objects share a cell: {self.objects}")
    if len({o.shape for o in self.objects}) != len(self.objects):
      raise ValueError(f"two objects share a shape: {self.objects}")

  def by_shape(self, shape: str) -> Obj:
    return next(o for o in self.objects if o.shape == shape)

  def free_cells(self) -> list[int]:
    used = {o.cell for o in self.objects}
    return [c for c in range(len(POSITIONS)) if c not in used]

  def free_shapes(self) -> list[str]:
    used = {o.shape for o in self.objects}
    return [s for s in SHAPES if s not in used]


def make_scene(objects: Sequence[Obj]) -> Scene:
  """A `Scene` of `objects` in canonical order."""
  return Scene(tuple(sorted(objects)))


def caption(scene: Scene) -> str:
  """Canonical caption, e.g. "red circle top left and blue square center"."""
  parts = [o.describe() for o in scene.objects]
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def scene_name(scene: Scene) -> str:
  """File stem of the scene, e.g. "0-red-circle_4-blue-square"; `parse_scene_name` inverts it."""
  return "_".join(f"{o.cell}-{o.colour}-{o.shape}" for o in scene.objects)


def parse_scene_name(name: str) -> Scene:
  """The scene of a `scene_name` (or of an image path ending in one plus ".jpg")."""
  stem = name.rsplit("/", 1)[-1].removesuffix(".jpg")
  objs = []
  for part in stem.split("_"):
    cell, colour, shape = part.split("-")
    objs.append(Obj(int(cell), colour, shape))
  return make_scene(objs)


def holds(relation: str, a: Obj, b: Obj) -> bool:
  """Whether `a` is `relation` `b` on the grid (strictly, by column or by row)."""
  (ra, ca), (rb, cb) = divmod(a.cell, 3), divmod(b.cell, 3)
  return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[relation]


def one_change_scenes(scene: Scene) -> list[Scene]:
  """Every valid scene that differs from `scene` in one attribute of one object (its colour,
  shape or cell): the demo world's hard negatives of an image or caption candidate."""
  out = []
  for o in scene.objects:
    rest = [x for x in scene.objects if x != o]
    changed = ([dataclasses.replace(o, colour=c) for c in COLOURS if c != o.colour] +
               [dataclasses.replace(o, shape=s) for s in scene.free_shapes()] +
               [dataclasses.replace(o, cell=c) for c in scene.free_cells()])
    out += [make_scene(rest + [x]) for x in changed]
  return sorted(out, key=scene_name)


# ----------------------------------------------------------------------------------------------
# Task 7: edits.


@dataclasses.dataclass(frozen=True)
class Edit:
  """One edit step. `target` is the object edited (None for "add"); the other fields are the new
  colour, shape or cell that the op sets (for "add": the added object's)."""
  op: str
  target: Obj | None
  colour: str | None = None
  shape: str | None = None
  cell: int | None = None


def valid_edits(scene: Scene, max_objects: int) -> dict[str, list[Edit]]:
  """Every edit that changes `scene` and keeps it valid, grouped by op (ops with none omitted)."""
  objs, free = scene.objects, scene.free_cells()
  out = {
    "recolour": [Edit("recolour", o, colour=c) for o in objs for c in COLOURS if c != o.colour],
    "move": [Edit("move", o, cell=c) for o in objs for c in free],
    "reshape": [Edit("reshape", o, shape=s) for o in objs for s in scene.free_shapes()],
    "remove": [Edit("remove", o) for o in objs] if len(objs) > 1 else [],
    "add": ([Edit("add", None, colour=c, shape=s, cell=cell) for s in scene.free_shapes()
             for c in COLOURS for cell in free] if len(objs) < max_objects else []),
  }
  return {op: edits for op, edits in out.items() if edits}


def apply_edit(scene: Scene, edit: Edit) -> tuple[Scene, Obj | None]:
  """The scene after `edit`, and the object the edit produced (None after "remove")."""
  if edit.op == "add":
    new = Obj(edit.cell, edit.colour, edit.shape)
    return make_scene(scene.objects + (new,)), new
  if edit.target not in scene.objects:
    raise ValueError(f"{edit} targets an object not in {scene}")
  rest = tuple(o for o in scene.objects if o != edit.target)
  if edit.op == "remove":
    return make_scene(rest), None
  new = _changed(edit)
  return make_scene(rest + (new,)), new


def _changed(edit: Edit) -> Obj:
  """The object a recolour, move or reshape turns its target into."""
  field = {"recolour": "colour", "move": "cell", "reshape": "shape"}[edit.op]
  return dataclasses.replace(edit.target, **{field: getattr(edit, field)})


def can_follow_on_same_object(first: Edit, second_op: str) -> bool:
  """Whether a second step of `second_op` may edit what `first` produced ("... and move it ...").

  Only object-keeping ops chain, and never the same op twice (that would be one edit).
  """
  return first.op in _KEEPS_OBJECT and second_op in _KEEPS_OBJECT and first.op != second_op


def edit_text(edits: Sequence[Edit]) -> str:
  """The instruction of a 1- or 2-step edit, e.g. "make the circle blue and move it to the center".

  A step on the object the previous step produced says "it"; two steps are joined by " and ",
  which a single step never contains.
  """
  phrases, previous = [], None
  for edit in edits:
    ref = "it" if previous is not None and edit.target == previous else f"the {_shape_of(edit)}"
    phrases.append(_edit_phrase(edit, ref))
    previous = _produced(edit)
  return " and ".join(phrases)


def _shape_of(edit: Edit) -> str:
  return edit.target.shape if edit.target is not None else edit.shape


def _produced(edit: Edit) -> Obj | None:
  if edit.op == "add":
    return Obj(edit.cell, edit.colour, edit.shape)
  return None if edit.op == "remove" else _changed(edit)


def _edit_phrase(edit: Edit, ref: str) -> str:
  if edit.op == "recolour":
    return f"make {ref} {edit.colour}"
  if edit.op == "move":
    return f"move {ref} to the {POSITIONS[edit.cell]}"
  if edit.op == "reshape":
    return f"turn {ref} into a {edit.shape}"
  if edit.op == "remove":
    return f"remove {ref}"
  return f"add a {edit.colour} {edit.shape} at the {POSITIONS[edit.cell]}"


def _edit_effect(edit: Edit) -> str:
  """The teacher's sentence for one applied step (the object named by its shape, which is unique
  in a scene)."""
  t = edit.target
  if edit.op == "recolour":
    return f"{t.shape} becomes {edit.colour}."
  if edit.op == "move":
    return f"{t.shape} moves to {POSITIONS[edit.cell]}."
  if edit.op == "reshape":
    return f"{t.shape} becomes {edit.shape}."
  if edit.op == "remove":
    return f"{t.shape} is removed."
  return f"{edit.colour} {edit.shape} is added {POSITIONS[edit.cell]}."


def teach_edit(source: Scene, edits: Sequence[Edit]) -> tuple[str, Scene]:
  """The teacher output for a task-7 query, and the target scene.

  Returns:
    (`"<reasoning>SOURCE. STEP. [STEP.]</reasoning><answer>TARGET</answer>"`, target scene),
    where SOURCE and TARGET are captions and each STEP states the effect of one edit.
  """
  scene, effects = source, []
  for edit in edits:
    effects.append(_edit_effect(edit))
    scene, _ = apply_edit(scene, edit)
  reasoning = " ".join([f"{caption(source)}."] + effects)
  return _wrap(reasoning, caption(scene)), scene


# ----------------------------------------------------------------------------------------------
# Task 6: questions.


@dataclasses.dataclass(frozen=True)
class Question:
  """A question about `subject`; relational kinds also name an `anchor` and a `relation`."""
  kind: str
  subject: Obj
  anchor: Obj | None = None
  relation: str | None = None


def valid_questions(scene: Scene) -> dict[str, list[Question]]:
  """Every well-posed question on `scene`, grouped by kind (kinds with none omitted).

  A relational question about "the shape REL the ANCHOR" is well-posed only when exactly one
  other object is REL the anchor. Yes/no questions list one question per (subject, anchor,
  relation), true or false.
  """
  objs = scene.objects
  out: dict[str, list[Question]] = {
    "colour_of": [Question("colour_of", o) for o in objs],
    "shape_at": [Question("shape_at", o) for o in objs],
    "where": [Question("where", o) for o in objs],
  }
  pairs = [(x, a) for a in objs for x in objs if x != a]
  unique = [(x, a, r) for x, a in pairs for r in RELATIONS
            if holds(r, x, a) and sum(holds(r, y, a) for y in objs if y != a) == 1]
  for kind in ("rel_colour", "rel_shape", "rel_object"):
    out[kind] = [Question(kind, x, a, r) for x, a, r in unique]
  out["yes_no"] = [Question("yes_no", x, a, r) for x, a in pairs for r in RELATIONS]
  return {kind: qs for kind, qs in out.items() if qs}


def question_text(q: Question) -> str:
  """E.g. "what colour is the shape left of the square?"."""
  s = q.subject
  if q.kind == "colour_of":
    return f"what colour is the {s.shape}?"
  if q.kind == "shape_at":
    return f"what shape is at the {s.position}?"
  if q.kind == "where":
    return f"where is the {s.shape}?"
  if q.kind == "rel_colour":
    return f"what colour is the shape {q.relation} the {q.anchor.shape}?"
  if q.kind == "rel_shape":
    return f"what shape is {q.relation} the {q.anchor.shape}?"
  if q.kind == "rel_object":
    return f"what is {q.relation} the {q.anchor.shape}?"
  return f"is the {s.shape} {q.relation} the {q.anchor.shape}?"


def answer(q: Question) -> str:
  """The answer string (one of `ANSWERS`)."""
  s = q.subject
  if q.kind in ("colour_of", "rel_colour"):
    return s.colour
  if q.kind in ("shape_at", "rel_shape"):
    return s.shape
  if q.kind == "where":
    return s.position
  if q.kind == "rel_object":
    return f"{s.colour} {s.shape}"
  return YES if holds(q.relation, s, q.anchor) else NO


def one_change_answers(text: str) -> list[str]:
  """The answers of the same kind as `text` that differ from it in one attribute (another
  colour, shape or position, the other of yes and no; a colour and shape with one of the two
  changed): the demo world's hard negatives of a task-6 answer."""
  for group in (COLOURS, SHAPES, POSITIONS, (YES, NO)):
    if text in group:
      return [a for a in group if a != text]
  colour, shape = text.split()
  return ([f"{c} {shape}" for c in COLOURS if c != colour] +
          [f"{colour} {s}" for s in SHAPES if s != shape])


def _locate(q: Question) -> str:
  """The teacher's sentence that finds the object the question points at (and, for yes/no
  questions, compares it with the anchor)."""
  s, a = q.subject, q.anchor
  if q.kind in ("colour_of", "where"):
    return f"{s.shape}: {s.describe()}."
  if q.kind == "shape_at":
    return f"{s.position}: {s.describe()}."
  if q.kind == "yes_no":
    verdict = "is" if holds(q.relation, s, a) else "is not"
    return (f"{s.shape} {s.position}, {a.shape} {a.position}: "
            f"{s.shape} {verdict} {q.relation} {a.shape}.")
  return f"{a.shape} {a.position}, {q.relation} it: {s.describe()}."


def teach_question(scene: Scene, q: Question) -> str:
  """The teacher output for a task-6 query.

  Returns:
    `"<reasoning>SOURCE. LOCATE.</reasoning><answer>ANSWER</answer>"`, SOURCE being the caption.
  """
  return _wrap(f"{caption(scene)}. {_locate(q)}", answer(q))


def _wrap(reasoning: str, answer_text: str) -> str:
  return f"<reasoning>{reasoning}</reasoning><answer>{answer_text}</answer>"
