"""A generated shapes world written out as M-BEIR + M-BEIR-CoT: the CPU stand-in for the real data.

`generate_world` samples scenes (1-2 coloured shapes on a 3x3 grid, rules in
`trace_jax.data.synthetic_teacher`), draws them with Pillow and writes four retrieval tasks in the
exact M-BEIR file layout (MBEIR_FORMAT.md), so the real readers and evaluator serve unchanged:

  task 0  text -> image         caption -> the scene's image
  task 3  image -> text         image -> its caption
  task 6  (image, question) -> text   e.g. "what colour is the shape left of the square?" -> "red"
  task 7  (image, edit) -> image      e.g. "make the circle blue and move it to the center"

Layout under `out_dir` (dataset id 10, "synthetic", is not one of M-BEIR's 0-9; `{s}` is the
split, train or test; `{k}` the task):

  query/{s}/mbeir_synthetic_task{k}_{s}.jsonl        one file per task and split
  query/union_train/mbeir_union_up_train.jsonl       all train queries, shuffled (as UniIR trains)
  cand_pool/local/mbeir_synthetic_task{k}_{s}_cand_pool.jsonl   split in the name, as MSCOCO's
  cand_pool/global/mbeir_union_{s}_cand_pool.jsonl   the union of the split's local pools
  qrels/{s}/mbeir_synthetic_task{k}_{s}_qrels.txt
  instructions/query_instructions.tsv                 one row per task, two prompts each
  mbeir_images/synthetic_images/{s}/<scene name>.jpg  one JPEG per scene used in the split
  cot/{s}/mbeir_synthetic_cot.jsonl    {"qid", "task_id", "route", "teacher_output"} per query
  world.json                           the summary `generate_world` returns

Task 0/3 pools hold the positives plus as many random distractor scenes per query; the task-7 pool
holds the targets and the source images (as distractors); the task-6 pool is every answer string.
Each query's `neg_cand_list` names its pool's candidates that differ from the positive in one
attribute (`data.hard_negatives="listed"` trains on them); evaluation ignores it, as M-BEIR's.
The test split is drawn and numbered first, from its own random streams, so it does not depend on
`n_train`. Every scene belongs to one split (a seeded draw per scene, `WorldSpec.
test_scene_fraction`) and a query of any task, its teacher text and its pool's distractors use
only its split's scenes: no test image or caption is seen in training, by any task. This module
does not tokenize, batch or evaluate; the world's rules and teacher text are in
`synthetic_teacher`, and drawing the queries and pools in `synthetic_draw`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import re
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

from PIL import Image, ImageDraw

from trace_jax.data import mbeir
from trace_jax.data import synthetic_teacher as rules
from trace_jax.data.synthetic_draw import (DrawnQuery, SceneSplit, WorldSpec, draw_pool,
                                           draw_splits, task_counts)

DATASET_ID = 10
DATASET_NAME = "synthetic"
IMAGE_DIR = "mbeir_images/synthetic_images"
TASKS = (0, 3, 6, 7)
# (query modality, candidate modality) of each task, as in UniIR's MBEIR_TASK map.
TASK_MODALITIES = {0: ("text", "image"), 3: ("image", "text"), 6: ("image,text", "text"),
                   7: ("image,text", "image")}
REASON_TASKS = (6, 7)
# DEMO_NOTES: a mix weighted 1:1:3:3 toward tasks 6/7 made reasoning pay most.
DEFAULT_TASK_MIX = MappingProxyType({0: 1.0, 3: 1.0, 6: 3.0, 7: 3.0})
# Short, as the demo's sequences must be (two prompts per task, as M-BEIR's table has).
INSTRUCTIONS = {
  0: ("Find the image of this caption.", "Retrieve the matching picture."),
  3: ("Find the caption of this image.", "Retrieve its description."),
  6: ("Answer the question about the image.", "Retrieve the answer."),
  7: ("Find the image after the edit.", "Retrieve the edited picture."),
}
RGB = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220),
       "yellow": (235, 190, 20)}
_BACKGROUND = (255, 255, 255)
_SPLITS = ("test", "train")  # drawing and numbering order


def render_scene(scene: rules.Scene, image_size: int = 56) -> Image.Image:
  """Draws `scene` on a white square.

  Returns:
    An RGB image of `image_size` x `image_size`; each object fills most of its grid cell.
  """
  img = Image.new("RGB", (image_size, image_size), _BACKGROUND)
  draw, cell = ImageDraw.Draw(img), image_size / 3
  for obj in scene.objects:
    row, col = divmod(obj.cell, 3)
    pad = 0.15 * cell
    x0, y0 = col * cell + pad, row * cell + pad
    x1, y1 = (col + 1) * cell - pad, (row + 1) * cell - pad
    box = [round(v) for v in (x0, y0, x1, y1)]
    if obj.shape == "circle":
      draw.ellipse(box, fill=RGB[obj.colour])
    elif obj.shape == "square":
      draw.rectangle(box, fill=RGB[obj.colour])
    else:
      points = [((x0 + x1) / 2, y0), (x0, y1), (x1, y1)]
      draw.polygon([(round(x), round(y)) for x, y in points], fill=RGB[obj.colour])
  return img


def image_path(split: str, scene: rules.Scene) -> str:
  """Path of the scene's JPEG relative to the M-BEIR root."""
  return f"{IMAGE_DIR}/{split}/{rules.scene_name(scene)}.jpg"


# ----------------------------------------------------------------------------------------------
# Writing files.


def _candidate_row(item: rules.Scene | str, task: int, split: str, did: str) -> dict[str, Any]:
  if TASK_MODALITIES[task][1] == "image":
    return {"txt": None, "img_path": image_path(split, item), "modality": "image", "did": did,
            "src_content": None}
  text = item if isinstance(item, str) else rules.caption(item)
  return {"txt": text, "img_path": None, "modality": "text", "did": did, "src_content": None}


def _query_row(q: DrawnQuery, split: str, qid: str, dids: Mapping[rules.Scene | str, str]
               ) -> dict[str, Any]:
  return {"qid": qid, "query_txt": q.text,
          "query_img_path": None if q.image is None else image_path(split, q.image),
          "query_modality": TASK_MODALITIES[q.task][0], "query_src_content": None,
          "pos_cand_list": [dids[q.positive]], "neg_cand_list": _negatives(q.positive, dids),
          "task_id": q.task}


def _negatives(positive: rules.Scene | str, dids: Mapping[rules.Scene | str, str]) -> list[str]:
  """The pool's candidates that differ from the positive in one attribute (its hard negatives,
  listed as M-BEIR lists CIRR's): derived from the pool, so they draw no random numbers."""
  near = (rules.one_change_answers(positive) if isinstance(positive, str)
          else rules.one_change_scenes(positive))
  return [dids[item] for item in near if item in dids]


def _cot_row(q: DrawnQuery, qid: str) -> dict[str, Any]:
  route = "reason" if q.teacher is not None else "direct"
  return {"qid": qid, "task_id": q.task, "route": route, "teacher_output": q.teacher}


def _write_lines(path: str, lines: Iterable[str]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    f.writelines(line + "\n" for line in lines)


def _write_jsonl(path: str, rows: Iterable[dict[str, Any]]) -> None:
  _write_lines(path, (json.dumps(r) for r in rows))


def _write_instructions(out_dir: str, tasks: Sequence[int]) -> None:
  header = "query_modality\tcand_modality\tdataset\tdataset_id\tprompt_1\tprompt_2"
  rows = ["\t".join(TASK_MODALITIES[t] + ("Synthetic", str(DATASET_ID)) + INSTRUCTIONS[t])
          for t in tasks]
  _write_lines(os.path.join(out_dir, "instructions", "query_instructions.tsv"), [header] + rows)


def _write_images(out_dir: str, split: str, scenes: Iterable[rules.Scene], size: int) -> int:
  names = sorted({image_path(split, s): s for s in scenes}.items())
  os.makedirs(os.path.join(out_dir, IMAGE_DIR, split), exist_ok=True)
  for path, scene in names:
    render_scene(scene, size).save(os.path.join(out_dir, path), format="JPEG", quality=95)
  return len(names)


def _file_names(task: int, split: str) -> dict[str, str]:
  name = f"mbeir_{DATASET_NAME}_task{task}_{split}"
  return {"query": f"query/{split}/{name}.jsonl",
          "pool": f"cand_pool/local/{name}_cand_pool.jsonl",
          "qrels": f"qrels/{split}/{name}_qrels.txt"}


class _Ids:
  """Sequential "10:n" ids; qids and dids are separate namespaces, each unique over all files."""

  def __init__(self):
    self._next = collections.Counter()

  def __call__(self, space: str) -> str:
    self._next[space] += 1
    return f"{DATASET_ID}:{self._next[space]}"


def _write_task(out_dir: str, split: str, task: int, queries: Sequence[DrawnQuery],
                pool: Sequence[rules.Scene | str], ids: _Ids) -> dict[str, list[dict]]:
  """Writes one task's query, pool and qrels files; returns its rows for the union files."""
  files = _file_names(task, split)
  dids = {item: ids("did") for item in pool}
  cands = [_candidate_row(item, task, split, dids[item]) for item in pool]
  rows, cot = [], []
  for q in queries:
    qid = ids("qid")
    rows.append(_query_row(q, split, qid, dids))
    cot.append(_cot_row(q, qid))
  _write_jsonl(os.path.join(out_dir, files["query"]), rows)
  _write_jsonl(os.path.join(out_dir, files["pool"]), cands)
  _write_lines(os.path.join(out_dir, files["qrels"]),
               (f"{r['qid']} 0 {d} 1 {task}" for r in rows for d in r["pos_cand_list"]))
  return {"queries": rows, "cands": cands, "cot": cot}


def _vocabulary(texts: Iterable[str | None]) -> list[str]:
  """Sorted lower-case words and punctuation marks of `texts`, teacher tags removed."""
  words = set()
  for text in texts:
    for tag in rules.TAGS:
      text = (text or "").replace(tag, " ")
    words.update(re.findall(r"[a-z]+|[^\sa-z]", text.lower()))
  return sorted(words)


def _summarize(tasks, drawn, written, n_images, seed, image_size, task_mix, spec) -> dict:
  """The `world.json` content (see `generate_world`)."""
  counts = {split: {str(t): {
    "queries": len(drawn[split][t]), "pool": len(written[split][t]["cands"]),
    "reason": sum(q.teacher is not None for q in drawn[split][t]),
    "kinds": dict(sorted(collections.Counter(q.kind for q in drawn[split][t]).items())),
  } for t in tasks} for split in _SPLITS}
  texts = [r["query_txt"] for s in _SPLITS for t in tasks for r in written[s][t]["queries"]]
  texts += [r["txt"] for s in _SPLITS for t in tasks for r in written[s][t]["cands"]]
  texts += [q.teacher for s in _SPLITS for t in tasks for q in drawn[s][t]]
  texts += [p for t in tasks for p in INSTRUCTIONS[t]]
  return {
    "dataset_id": DATASET_ID, "dataset": DATASET_NAME, "seed": seed, "image_size": image_size,
    "task_mix": {str(t): task_mix[t] for t in tasks},
    "spec": {**dataclasses.asdict(spec), "object_counts": list(spec.object_counts)},
    "counts": counts, "images": n_images,
    "files": {s: {str(t): _file_names(t, s) for t in tasks} for s in _SPLITS},
    "cot": {s: f"cot/{s}/mbeir_{DATASET_NAME}_cot.jsonl" for s in _SPLITS},
    "shapes": list(rules.SHAPES), "colours": list(rules.COLOURS),
    "positions": list(rules.POSITIONS), "answers": list(rules.ANSWERS),
    "tags": list(rules.TAGS), "vocabulary": _vocabulary(texts),
  }


# ----------------------------------------------------------------------------------------------
# Entry point.


def _write_split(out_dir: str, split: str, drawn: Mapping[int, list[DrawnQuery]], seed: int,
                 spec: WorldSpec, image_size: int, ids: _Ids,
                 scene_split: SceneSplit) -> tuple[dict, int]:
  """Writes one split's per-task files, images, CoT file and union pool.

  Returns:
    (rows written per task, as `_write_task` returns them; number of images).
  """
  written, scenes = {}, []
  for t, queries in drawn.items():
    pool = draw_pool(t, queries, random.Random(f"{seed}/{split}/task{t}/pool"), spec, split,
                     scene_split)
    written[t] = _write_task(out_dir, split, t, queries, pool, ids)
    scenes += [s for s in pool if isinstance(s, rules.Scene)]
    scenes += [q.image for q in queries if q.image is not None]
  n_images = _write_images(out_dir, split, scenes, image_size)
  _write_jsonl(os.path.join(out_dir, "cot", split, f"mbeir_{DATASET_NAME}_cot.jsonl"),
               (r for rows in written.values() for r in rows["cot"]))
  _write_jsonl(os.path.join(out_dir, "cand_pool", "global", f"mbeir_union_{split}_cand_pool.jsonl"),
               (c for rows in written.values() for c in rows["cands"]))
  return written, n_images


def _check_args(out_dir: str, image_size: int, n_train: int, n_test: int,
                task_mix: Mapping[int, float]) -> None:
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"{out_dir} is not empty; the world is written into an empty folder")
  if image_size < 12:
    raise ValueError(f"image_size {image_size} is too small to draw shapes")
  if n_train < 0 or n_test < 1:
    raise ValueError(f"need n_train >= 0 and n_test >= 1, got {n_train}, {n_test}")
  bad = [t for t in task_mix if t not in TASKS]
  if bad or min(task_mix.values(), default=0) < 0 or sum(task_mix.values()) <= 0:
    raise ValueError(f"task_mix must weight tasks {TASKS} with weights >= 0, got {task_mix}")


def generate_world(out_dir: str, *, seed: int = 0, image_size: int = 56, n_train: int = 4000,
                   n_test: int = 200, task_mix: Mapping[int, float] = DEFAULT_TASK_MIX,
                   spec: WorldSpec = WorldSpec()) -> dict[str, Any]:
  """Draws the world and writes it under `out_dir` (see the module docstring for the layout).

  The same arguments give byte-identical files. The default size takes a few seconds.

  Args:
    out_dir: the M-BEIR root to write; must be empty or not exist.
    seed: seeds every random stream.
    image_size: side of the square images in pixels; 56 (a multiple of 28) gives Qwen2-VL a fixed
      4x4 patch grid, i.e. 4 merged image tokens.
    n_train: train queries in all, spread over the tasks by `task_mix`.
    n_test: test queries per task (each task's test queries are all different).
    task_mix: relative weight of each task id (0, 3, 6, 7) in train; tasks weighted 0 or left
      out are not generated in either split.
    spec: how scenes, edits and questions are drawn.

  Returns:
    The summary also written to `world.json`: counts per split and task (queries, pool size,
    reasoning targets, query kinds), images per split, file names, seed, the vocabulary (every
    lower-case word and punctuation mark in queries, candidates, instructions and teacher outputs)
    and the teacher tags.
  """
  _check_args(out_dir, image_size, n_train, n_test, task_mix)
  tasks = tuple(t for t in TASKS if task_mix.get(t, 0) > 0)
  sizes = {"test": dict.fromkeys(tasks, n_test),
           "train": task_counts(n_train, {t: task_mix[t] for t in tasks})}
  scene_split = SceneSplit(seed, spec.test_scene_fraction)
  drawn = draw_splits(sizes, seed, spec, scene_split)
  ids, written, n_images = _Ids(), {}, {}
  for split in _SPLITS:
    written[split], n_images[split] = _write_split(out_dir, split, drawn[split], seed, spec,
                                                   image_size, ids, scene_split)
  union = [r for t in tasks for r in written["train"][t]["queries"]]
  random.Random(f"{seed}/union_train").shuffle(union)
  _write_jsonl(os.path.join(out_dir, "query", "union_train", "mbeir_union_up_train.jsonl"), union)
  _write_instructions(out_dir, tasks)
  summary = _summarize(tasks, drawn, written, n_images, seed, image_size, task_mix, spec)
  _write_lines(os.path.join(out_dir, "world.json"), [json.dumps(summary, indent=1)])
  return summary


def split_files(world: str, split: str) -> tuple[dict[int, dict[str, str]], str]:
  """(task -> {"query", "pool"} paths, CoT path), relative to the world, of a demo world's split,
  from its `world.json`.

  Raises:
    FileNotFoundError: no `world.json` (not a demo world).
    KeyError: the world has no such split.
  """
  summary = os.path.join(world, "world.json")
  if not os.path.isfile(summary):
    raise FileNotFoundError(f"{summary} not found: only the demo world layout is supported")
  with open(summary) as f:
    info = json.load(f)
  if split not in info["files"]:
    raise KeyError(f"{world} has no split {split!r}; it has {sorted(info['files'])}")
  files = {int(task): dict(names) for task, names in info["files"][split].items()}
  return dict(sorted(files.items())), info["cot"][split]


def eval_tasks(world: str, split: str = "test") -> list[mbeir.EvalTask]:
  """The world's tasks as `mbeir.EvalTask`s (headline Recall@5), for the M-BEIR evaluator."""
  files, _ = split_files(world, split)
  return [mbeir.EvalTask(f"{DATASET_NAME}_task{k}", "Synthetic", k, f["query"], f["pool"],
                         f["qrels"], 5) for k, f in files.items()]
