"""Tests of the synthetic shapes world: its rules and teacher, and the M-BEIR files it writes.

Small worlds only (a few hundred queries); the default size and its timing are not tested here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from trace_jax.data import synthetic
from trace_jax.data import synthetic_teacher as rules
from trace_jax.data.synthetic_teacher import Edit, Obj, Question

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = {"n_train": 160, "n_test": 20}
QUERY_KEYS = ["qid", "query_txt", "query_img_path", "query_modality", "query_src_content",
              "pos_cand_list", "neg_cand_list", "task_id"]
CAND_KEYS = ["txt", "img_path", "modality", "did", "src_content"]
TEACHER = re.compile(r"^<reasoning>([^<>]+)</reasoning><answer>([^<>]+)</answer>$")


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def all_files(root: str) -> dict[str, bytes]:
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      with open(os.path.join(d, n), "rb") as f:
        out[os.path.relpath(os.path.join(d, n), root)] = f.read()
  return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("world") / "w")
  return out, synthetic.generate_world(out, seed=3, **SMALL)


def task_files(world, split: str, task: int):
  """(queries, pool by did, qrels lines) of one task and split."""
  out, summary = world
  files = summary["files"][split][str(task)]
  queries = read_jsonl(os.path.join(out, files["query"]))
  pool = {c["did"]: c for c in read_jsonl(os.path.join(out, files["pool"]))}
  with open(os.path.join(out, files["qrels"])) as f:
    qrels = f.read().splitlines()
  return queries, pool, qrels


def cot_by_qid(world, split: str) -> dict[str, dict]:
  out, summary = world
  return {r["qid"]: r for r in read_jsonl(os.path.join(out, summary["cot"][split]))}


def each_task(world):
  for split in ("train", "test"):
    for task in synthetic.TASKS:
      yield split, task, task_files(world, split, task)


# ----------------------------------------------------------------------------------------------
# Rules and teacher.

SCENE = rules.make_scene([Obj(4, "blue", "square"), Obj(0, "red", "circle")])


def test_caption_and_name_round_trip():
  assert rules.caption(SCENE) == "red circle top left and blue square center"
  assert rules.scene_name(SCENE) == "0-red-circle_4-blue-square"
  assert rules.parse_scene_name("a/b/0-red-circle_4-blue-square.jpg") == SCENE


def test_scene_rejects_shared_shape_or_cell():
  with pytest.raises(ValueError, match="shape"):
    rules.make_scene([Obj(0, "red", "circle"), Obj(1, "red", "circle")])
  with pytest.raises(ValueError, match="cell"):
    rules.make_scene([Obj(0, "red", "circle"), Obj(0, "red", "square")])


def test_two_step_edit_on_same_object_says_it():
  first = Edit("recolour", Obj(0, "red", "circle"), colour="blue")
  second = Edit("move", Obj(0, "blue", "circle"), cell=8)
  assert rules.edit_text([first, second]) == "make the circle blue and move it to the bottom right"
  teacher, target = rules.teach_edit(SCENE, [first, second])
  assert target == rules.make_scene([Obj(4, "blue", "square"), Obj(8, "blue", "circle")])
  assert teacher == (
    "<reasoning>red circle top left and blue square center. circle becomes blue. "
    "circle moves to bottom right.</reasoning>"
    "<answer>blue square center and blue circle bottom right</answer>")


def test_remove_then_edit_other_object():
  edits = [Edit("remove", Obj(4, "blue", "square")),
           Edit("reshape", Obj(0, "red", "circle"), shape="triangle")]
  assert rules.edit_text(edits) == "remove the square and turn the circle into a triangle"
  _, target = rules.teach_edit(SCENE, edits)
  assert rules.caption(target) == "red triangle top left"


def test_valid_edits_respect_max_objects():
  assert "add" not in rules.valid_edits(SCENE, max_objects=2)
  assert "remove" not in rules.valid_edits(rules.make_scene([Obj(0, "red", "circle")]), 2)
  for edits in rules.valid_edits(SCENE, max_objects=3).values():
    for edit in edits:
      assert rules.apply_edit(SCENE, edit)[0] != SCENE


def test_relational_questions_need_a_unique_referent():
  three = rules.make_scene([Obj(0, "red", "circle"), Obj(3, "green", "square"),
                            Obj(5, "blue", "triangle")])
  rel = rules.valid_questions(three)["rel_colour"]
  # The circle and the square are both left of the triangle: "left of the triangle" is ambiguous.
  assert not any(q.anchor.shape == "triangle" and q.relation == "left of" for q in rel)
  q = Question("rel_colour", Obj(0, "red", "circle"), Obj(3, "green", "square"), "above")
  assert q in rel
  assert rules.question_text(q) == "what colour is the shape above the square?"
  assert rules.answer(q) == "red"
  assert TEACHER.match(rules.teach_question(three, q)).group(2) == "red"


def test_question_teacher_restates_the_scene_then_locates():
  circle, square = SCENE.objects
  q = Question("rel_shape", square, circle, "below")
  assert rules.teach_question(SCENE, q) == (
    "<reasoning>red circle top left and blue square center. circle top left, below it: "
    "blue square center.</reasoning><answer>square</answer>")
  q = Question("yes_no", square, circle, "left of")
  assert rules.teach_question(SCENE, q) == (
    "<reasoning>red circle top left and blue square center. square center, circle top left: "
    "square is not left of circle.</reasoning><answer>no</answer>")


def test_yes_no_answers_follow_the_grid():
  circle, square = SCENE.objects
  assert rules.answer(Question("yes_no", circle, square, "left of")) == "yes"
  assert rules.answer(Question("yes_no", circle, square, "below")) == "no"
  assert set(rules.ANSWERS) >= {rules.answer(q) for qs in rules.valid_questions(SCENE).values()
                                for q in qs}


def changed_fields(a: rules.Scene, b: rules.Scene) -> list[str] | None:
  """The fields that differ between two scenes, object by object, when exactly one object of
  each differs (None otherwise)."""
  only_a = [o for o in a.objects if o not in b.objects]
  only_b = [o for o in b.objects if o not in a.objects]
  if len(a.objects) != len(b.objects) or len(only_a) != 1 or len(only_b) != 1:
    return None
  return [f for f in ("cell", "colour", "shape") if getattr(only_a[0], f) != getattr(only_b[0], f)]


def test_one_change_neighbours_of_a_scene_and_of_an_answer():
  near = rules.one_change_scenes(SCENE)
  # Per object: 3 other colours, the 1 free shape, the 7 free cells.
  assert len(near) == len(set(near)) == 2 * (3 + 1 + 7)
  assert all(len(changed_fields(SCENE, s) or []) == 1 for s in near)
  assert rules.one_change_answers("yes") == ["no"]
  assert rules.one_change_answers("red") == ["green", "blue", "yellow"]
  assert len(rules.one_change_answers("top left")) == 8
  assert rules.one_change_answers("red circle") == [
    "green circle", "blue circle", "yellow circle", "red square", "red triangle"]
  assert {a for t in rules.ANSWERS for a in rules.one_change_answers(t)} == set(rules.ANSWERS)


def test_render_scene_is_rgb_and_coloured_where_the_object_is():
  img = synthetic.render_scene(SCENE, 56)
  assert (img.mode, img.size) == ("RGB", (56, 56))
  assert img.getpixel((9, 9)) == synthetic.RGB["red"]
  assert img.getpixel((28, 28)) == synthetic.RGB["blue"]
  assert img.getpixel((50, 5)) == (255, 255, 255)


# ----------------------------------------------------------------------------------------------
# The written world.


def test_same_seed_gives_same_bytes_and_another_seed_does_not(world, tmp_path):
  out, _ = world
  synthetic.generate_world(str(tmp_path / "again"), seed=3, **SMALL)
  synthetic.generate_world(str(tmp_path / "other"), seed=4, **SMALL)
  first = all_files(out)
  assert all_files(str(tmp_path / "again")) == first
  assert all_files(str(tmp_path / "other")) != first


def test_test_split_does_not_depend_on_n_train(world, tmp_path):
  synthetic.generate_world(str(tmp_path / "w"), seed=3, n_train=40, n_test=SMALL["n_test"])
  test_files = lambda files: {k: v for k, v in files.items() if "test" in k and "union" not in k}
  assert test_files(all_files(str(tmp_path / "w"))) == test_files(all_files(world[0]))


def test_every_file_kind_exists(world):
  out, summary = world
  paths = ["world.json", "instructions/query_instructions.tsv",
           "query/union_train/mbeir_union_up_train.jsonl",
           "cand_pool/global/mbeir_union_train_cand_pool.jsonl",
           "cand_pool/global/mbeir_union_test_cand_pool.jsonl"]
  paths += list(summary["cot"].values())
  paths += [p for split in summary["files"].values() for f in split.values() for p in f.values()]
  assert len(paths) == 5 + 2 + 2 * 4 * 3
  for p in paths:
    assert os.path.getsize(os.path.join(out, p)) > 0, p
  with open(os.path.join(out, "world.json")) as f:
    assert json.load(f) == summary


def test_counts_follow_the_task_mix(world):
  counts = world[1]["counts"]
  assert [counts["train"][str(t)]["queries"] for t in synthetic.TASKS] == [20, 20, 60, 60]
  assert all(counts["test"][str(t)]["queries"] == SMALL["n_test"] for t in synthetic.TASKS)


def test_lines_have_the_real_mbeir_keys_and_types(world):
  for _, task, (queries, pool, qrels) in each_task(world):
    qmod, cmod = synthetic.TASK_MODALITIES[task]
    for q in queries:
      assert list(q) == QUERY_KEYS
      assert re.fullmatch(r"10:[1-9]\d*", q["qid"]) and q["task_id"] == task
      assert q["query_modality"] == qmod
      assert (q["query_txt"] is None) == (task == 3)
      assert (q["query_img_path"] is None) == (task == 0)
      assert all(isinstance(d, str) for d in q["pos_cand_list"])
    for c in pool.values():
      assert list(c) == CAND_KEYS and c["modality"] == cmod
      assert (c["txt"] is None) == (cmod == "image") and (c["img_path"] is None) == (cmod == "text")
    assert qrels == [f"{q['qid']} 0 {d} 1 {task}" for q in queries for d in q["pos_cand_list"]]


def test_ids_are_unique_and_positives_are_in_the_pool(world):
  qids, dids = [], []
  for _, _, (queries, pool, _) in each_task(world):
    qids += [q["qid"] for q in queries]
    dids += list(pool)
    for q in queries:
      assert set(q["pos_cand_list"]) <= set(pool), q
  assert len(set(qids)) == len(qids) and len(set(dids)) == len(dids)


def test_every_image_exists_and_is_a_56_pixel_rgb_jpeg(world):
  out, _ = world
  paths = set()
  for _, _, (queries, pool, _) in each_task(world):
    paths |= {q["query_img_path"] for q in queries} | {c["img_path"] for c in pool.values()}
  paths.discard(None)
  assert paths
  for p in paths:
    assert p.startswith("mbeir_images/synthetic_images/") and p.endswith(".jpg")
    with Image.open(os.path.join(out, p)) as img:
      assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (56, 56))


def test_positives_match_their_query(world):
  for _, task, (queries, pool, _) in each_task(world):
    for q in queries:
      pos = pool[q["pos_cand_list"][0]]
      if task == 0:
        assert rules.caption(rules.parse_scene_name(pos["img_path"])) == q["query_txt"]
      if task == 3:
        assert rules.caption(rules.parse_scene_name(q["query_img_path"])) == pos["txt"]


def test_routes_and_teacher_answers(world):
  for split, task, (queries, pool, _) in each_task(world):
    cot = cot_by_qid(world, split)
    for q in queries:
      row = cot[q["qid"]]
      assert list(row) == ["qid", "task_id", "route", "teacher_output"]
      assert row["task_id"] == task
      if task in (0, 3):
        assert row["route"] == "direct" and row["teacher_output"] is None
        continue
      assert row["route"] == "reason"
      reasoning, answer = TEACHER.match(row["teacher_output"]).groups()
      source = rules.parse_scene_name(q["query_img_path"])
      assert reasoning.startswith(f"{rules.caption(source)}.")
      pos = pool[q["pos_cand_list"][0]]
      if task == 7:
        assert answer == rules.caption(rules.parse_scene_name(pos["img_path"]))
      else:
        assert answer == pos["txt"]


def test_cot_has_one_line_per_query(world):
  for split in ("train", "test"):
    qids = [q["qid"] for task in synthetic.TASKS for q in task_files(world, split, task)[0]]
    lines = read_jsonl(os.path.join(world[0], world[1]["cot"][split]))
    assert [r["qid"] for r in lines] == qids


def test_edits_change_the_scene_and_the_pool_holds_the_source(world):
  two_step = 0
  for split in ("train", "test"):
    queries, pool, _ = task_files(world, split, 7)
    images = {c["img_path"] for c in pool.values()}
    for q in queries:
      assert pool[q["pos_cand_list"][0]]["img_path"] != q["query_img_path"]
      assert q["query_img_path"] in images
      two_step += " and " in q["query_txt"]
  assert 20 <= two_step <= 60  # of 80 queries, half two-step by default


def test_negatives_are_the_pool_items_one_attribute_from_the_positive(world):
  def text(c):  # A candidate as text: its answer or caption, or its image's caption.
    return c["txt"] or rules.caption(rules.parse_scene_name(c["img_path"]))
  listed = {task: 0 for task in synthetic.TASKS}
  for _, task, (queries, pool, _) in each_task(world):
    texts = {text(c) for c in pool.values()}
    for q in queries:
      pos = pool[q["pos_cand_list"][0]]
      if task == 6:
        near = rules.one_change_answers(pos["txt"])
      else:
        scene = rules.parse_scene_name(q["query_img_path"] if task == 3 else pos["img_path"])
        near = [rules.caption(s) for s in rules.one_change_scenes(scene)]
      negs = [text(pool[d]) for d in q["neg_cand_list"]]
      assert sorted(negs) == sorted(set(near) & texts), q
      listed[task] += bool(negs)
      assert negs or task != 6  # Every answer has neighbours in the answer set.
  assert all(listed.values()), listed  # Small pools: not every scene has a neighbour in them.


def test_task6_pool_is_the_answer_set(world):
  for split in ("train", "test"):
    _, pool, _ = task_files(world, split, 6)
    assert [c["txt"] for c in pool.values()] == list(rules.ANSWERS)


def split_captions(world, split: str) -> tuple[set[str], int]:
  """Captions of every scene a split's files show: query images, pool images and texts, and the
  scenes the teacher's outputs describe (the source caption opening the reasoning; task 7's
  answer); and how many of those scenes have one object."""
  scenes, texts = set(), set()
  cot = cot_by_qid(world, split)
  for task in synthetic.TASKS:
    queries, pool, _ = task_files(world, split, task)
    scenes |= {rules.parse_scene_name(q["query_img_path"]) for q in queries
               if q["query_img_path"]}
    scenes |= {rules.parse_scene_name(c["img_path"]) for c in pool.values() if c["img_path"]}
    if task == 3:
      texts |= {c["txt"] for c in pool.values()}
    for q in queries:
      teacher = cot[q["qid"]]["teacher_output"]
      if teacher:
        reasoning, answer = TEACHER.match(teacher).groups()
        texts.add(reasoning.split(". ", 1)[0].removesuffix("."))
        if task == 7:
          texts.add(answer)
  return {rules.caption(s) for s in scenes} | texts, sum(len(s.objects) == 1 for s in scenes)


def test_no_test_scene_is_seen_in_training_by_any_task(world):
  test, test_single = split_captions(world, "test")
  train, train_single = split_captions(world, "train")
  assert not test & train
  assert test_single and train_single  # Both splits keep one-object scenes.
  assert any(" and " in c for c in test) and any(" and " in c for c in train)


def test_instructions_have_one_row_per_task(world):
  with open(os.path.join(world[0], "instructions/query_instructions.tsv")) as f:
    header, *rows = [line.split("\t") for line in f.read().splitlines()]
  assert header[:4] == ["query_modality", "cand_modality", "dataset", "dataset_id"]
  assert header[4] == "prompt_1"
  keys = {f"{r[3]}, {r[0]}, {r[1]}" for r in rows}
  assert keys == {f"10, {q}, {c}" for q, c in synthetic.TASK_MODALITIES.values()}


def test_vocabulary_covers_every_text(world):
  vocab = set(world[1]["vocabulary"])
  for split, _, (queries, pool, _) in each_task(world):
    texts = [q["query_txt"] for q in queries] + [c["txt"] for c in pool.values()]
    texts += [r["teacher_output"] for r in cot_by_qid(world, split).values()]
    for text in filter(None, texts):
      for tag in rules.TAGS:
        text = text.replace(tag, " ")
      assert set(re.findall(r"[a-z]+|[^\sa-z]", text)) <= vocab


def test_bad_arguments_raise(world, tmp_path):
  with pytest.raises(FileExistsError):
    synthetic.generate_world(world[0], **SMALL)
  with pytest.raises(ValueError, match="task_mix"):
    synthetic.generate_world(str(tmp_path / "a"), task_mix={1: 1.0}, **SMALL)
  with pytest.raises(ValueError, match="could not draw 500 test queries of task 0"):
    synthetic.generate_world(str(tmp_path / "b"), n_train=0, n_test=500, task_mix={0: 1.0},
                             spec=synthetic.WorldSpec(object_counts=(1.0,)))
  with pytest.raises(ValueError, match="test_scene_fraction"):
    synthetic.WorldSpec(test_scene_fraction=1.0)


def test_make_world_tool(tmp_path):
  out = str(tmp_path / "w")
  cmd = [sys.executable, "-m", "trace_jax.tools.make_world", f"--out={out}", "--n_train=16",
         "--n_test=4", "--task_mix=6:1,7:1", "--seed=1"]
  done = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  with open(os.path.join(out, "world.json")) as f:
    assert sorted(json.load(f)["counts"]["train"]) == ["6", "7"]
  assert '"vocabulary_size"' in done.stdout
