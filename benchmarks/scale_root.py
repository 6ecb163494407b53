"""Writes an M-BEIR-shaped root at a fraction F of the real benchmark's cardinalities.

    python -m benchmarks.scale_root --scale=0.001 --out=runs/scale/root_0.001 [--seed=0]

The root has the real layout and file format (`trace_jax/data/mbeir.py`, `/work/shared`'s
MBEIR_FORMAT.md, `tests/fixtures/mbeir_mini`): the 16 test tasks with their query files, local
pools and qrels, the union test pool (the 16 local pools, sorted by `(dataset id, n)`), the ten
per-dataset training files with the union training pool and their qrels, and the instructions
TSV. Counts are the real ones (`TASK_COUNTS`, from the UniIR paper) times F, rounded to the
nearest integer and at least 1. Texts are synthetic English-like word strings whose lengths are
drawn like the real ones; images are small JPEGs. It is not M-BEIR: no text means anything, so
recall is noise; the point is the shapes (row counts, text lengths, image counts, file sizes).

Images. Every query and candidate with an image gets its own path (as in the real data, where
paths are unique per item), but each path is a hard link to one of `DISTINCT_IMAGES` JPEGs per
dataset: a distinct JPEG per item would cost hours and hundreds of GB at F=1 while a reader's
cost (open, decode, resize) is the same for a linked file. Page-cache effects are thereby
optimistic: say so beside any I/O number.

Bad rows, at every F (listed in `scale_root.json` with file, line and id): a test query whose
image file is missing (cirr_task7), a training query whose image file is missing (CIRR train),
a local-pool candidate with an empty text (webqa_task1, also in the union pool) and a union
training pool candidate with an empty text. Stages must name them or count them as skipped.

Not written: the val splits, `query/union_train` (the up-sampled union; training reads the
per-dataset files as the teacher does), `instructions/candidate_metadata.tsv`, OVEN positives
carrying InfoSeek dids. Writing streams row by row (memory-flat) and is seeded (same F and seed,
same bytes).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
import shutil
from typing import Iterator

from absl import app, flags

from trace_jax.data import mbeir

# (task name, query train, query test, local pool), from UniIR (Wei et al., ECCV 2024,
# arXiv:2311.17136), Table 1 "M-BEIR statistics"; the paper prints thousands (e.g. 99K), taken
# here as exact. Sums: 1.15M training queries, 190K test queries, 5.56M candidates (the union
# test pool). The training counts are per task; a dataset's training file holds its tasks'.
TASK_COUNTS: tuple[tuple[str, int, int, int], ...] = (
    ("visualnews_task0", 99_000, 20_000, 542_000),
    ("mscoco_task0", 100_000, 24_800, 5_000),
    ("fashion200k_task0", 15_000, 1_700, 201_000),
    ("webqa_task1", 16_000, 2_400, 544_000),
    ("edis_task2", 26_000, 3_200, 1_000_000),
    ("webqa_task2", 17_000, 2_500, 403_000),
    ("visualnews_task3", 100_000, 20_000, 537_000),
    ("mscoco_task3", 113_000, 5_000, 25_000),
    ("fashion200k_task3", 15_000, 4_800, 61_000),
    ("nights_task4", 16_000, 2_000, 40_000),
    ("oven_task6", 150_000, 50_000, 676_000),
    ("infoseek_task6", 141_000, 11_000, 611_000),
    ("fashioniq_task7", 16_000, 6_000, 74_000),
    ("cirr_task7", 26_000, 4_000, 21_000),
    ("oven_task8", 157_000, 14_700, 335_000),
    ("infoseek_task8", 143_000, 17_600, 481_000),
)
# The reasoning subset (TRACE.md: composed and knowledge-intensive queries), which the teacher
# routes to generation with configs/teach.py's default `assess.reason`.
REASONING_DATASETS = ("CIRR", "FashionIQ", "INFOSEEK", "OVEN")

# Text kinds: (median words, log-normal sigma, max words). Wikipedia passages (OVEN, InfoSeek
# and WebQA candidates) have a heavy tail: ~5% are past 800 words (~1,024 tokens of a real
# tokenizer); captions and product titles are short.
TEXT_KINDS = {
    "caption": (10, 0.35, 40), "news": (18, 0.4, 60), "headline": (11, 0.3, 30),
    "product": (6, 0.35, 20), "wiki": (180, 0.9, 3000), "question": (9, 0.3, 30),
    "edit": (11, 0.4, 40),
}
# Per dataset: (query text kind, candidate text kind, image directory under mbeir_images/).
DATASET_STYLE = {
    "VisualNews": ("news", "news", "visualnews_images"),
    "MSCOCO": ("caption", "caption", "mscoco_images"),
    "Fashion200K": ("product", "product", "fashion200k_images"),
    "WebQA": ("question", "wiki", "webqa_images"),
    "EDIS": ("headline", "headline", "edis_images"),
    "NIGHTS": ("caption", "caption", "nights_images"),
    "OVEN": ("question", "wiki", "oven_images"),
    "INFOSEEK": ("question", "wiki", "oven_images"),
    "FashionIQ": ("edit", "product", "fashioniq_images"),
    "CIRR": ("edit", "caption", "cirr_images"),
}
WORDS = tuple(
    "the a of and in to with on at for from by is are was this that it its an as over under "
    "man woman child dog cat car street building tower river bridge city park table chair red "
    "blue green white black yellow small large old new tall short wooden stone glass metal "
    "shirt dress shoe bag jacket sleeve collar pattern striped floral cotton leather year war "
    "president team game season church museum species bird flower tree mountain lake island "
    "north south east west century king queen film album song company university station "
    "people group standing sitting walking holding looking next behind front near two three "
    "image photo picture shows different instead more less darker lighter longer without".split())
DISTINCT_IMAGES = 8  # Distinct JPEGs per dataset that item paths link to.
_PER_DIR = 1000  # Image files per directory.
# Offset of training candidates' dids: test pools use n < 2M within each dataset.
_TRAIN_DID_OFFSET = 2_000_000
MANIFEST = "scale_root.json"


def scaled(n: int, scale: float) -> int:
  """The count at fraction `scale`: `round(n * scale)`, at least 1."""
  return max(1, int(round(n * scale)))


def draw_text(rng: random.Random, kind: str) -> str:
  """A text of `kind` (`TEXT_KINDS`) with a log-normally drawn number of words."""
  median, sigma, cap = TEXT_KINDS[kind]
  n = min(cap, max(1, int(round(median * math.exp(rng.gauss(0.0, sigma))))))
  return " ".join(rng.choices(WORDS, k=n)).capitalize() + "."


@dataclasses.dataclass
class _Writer:
  """Open output files, byte and row counts, and the bad rows written so far."""
  root: str
  scale: float
  seed: int
  files: dict = dataclasses.field(default_factory=dict)
  lines: dict = dataclasses.field(default_factory=dict)
  bad: list = dataclasses.field(default_factory=list)
  images: int = 0

  def write(self, rel: str, line: str) -> int:
    """Appends `line` to `rel`; returns its 1-based line number."""
    if rel not in self.files:
      path = os.path.join(self.root, rel)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      self.files[rel] = open(path, "w", encoding="utf-8")
      self.lines[rel] = 0
    self.files[rel].write(line)
    self.lines[rel] += 1
    return self.lines[rel]

  def image(self, dataset: str, kind: str, n: int, missing: bool = False) -> str:
    """A new image path (a hard link to one of the dataset's JPEGs), or a missing one."""
    folder = DATASET_STYLE[dataset][2]  # OVEN and InfoSeek share one: the id names the dataset.
    rel = (f"mbeir_images/{folder}/{kind}/{mbeir.DATASET_IDS[dataset]}_{n // _PER_DIR:04d}/"
           f"{n % _PER_DIR}.jpg")
    if missing:
      return rel.replace(".jpg", "_missing.jpg")
    path = os.path.join(self.root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.link(self._source(folder, n % DISTINCT_IMAGES), path)
    self.images += 1
    return rel

  def _source(self, folder: str, k: int) -> str:
    path = os.path.join(self.root, "mbeir_images", folder, "_distinct", f"{k}.jpg")
    if not os.path.exists(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "wb") as f:
        f.write(_jpeg(random.Random(f"{self.seed}:{folder}:{k}")))
    return path

  def close(self):
    for f in self.files.values():
      f.close()


def _jpeg(rng: random.Random) -> bytes:
  """A small RGB JPEG, 48-96 px a side with a varying aspect ratio, two coloured blocks."""
  from PIL import Image, ImageDraw
  w, h = rng.randint(48, 96), rng.randint(48, 96)
  img = Image.new("RGB", (w, h), tuple(rng.randint(0, 255) for _ in range(3)))
  ImageDraw.Draw(img).rectangle((w // 4, h // 4, 3 * w // 4, 3 * h // 4),
                                fill=tuple(rng.randint(0, 255) for _ in range(3)))
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=85)
  return buf.getvalue()


def _by_dataset() -> Iterator[tuple[str, list[tuple[mbeir.EvalTask, int, int, int]]]]:
  """(dataset, [(task, train, test, pool), ...]) in dataset-id order, tasks in UniIR order."""
  counts = {name: (train, test, pool) for name, train, test, pool in TASK_COUNTS}
  for dataset, _ in sorted(mbeir.DATASET_IDS.items(), key=lambda kv: kv[1]):
    if dataset not in DATASET_STYLE:  # The demo world's id.
      continue
    yield dataset, [(t, *counts[t.name]) for t in mbeir.EVAL_TASKS if t.dataset == dataset]


def _candidate(w: _Writer, rng: random.Random, dataset: str, modality: str, n: int,
               image_kind: str, empty_text: bool = False) -> str:
  """One pool line in the real key order; VisualNews lines have no `src_content` key."""
  text = draw_text(rng, DATASET_STYLE[dataset][1]) if "text" in modality else None
  if empty_text:
    text = ""
  image = w.image(dataset, image_kind, n) if "image" in modality else None
  ds = mbeir.DATASET_IDS[dataset]
  record = {"txt": text, "img_path": image, "modality": modality, "did": f"{ds}:{n}"}
  if dataset != "VisualNews":
    record["src_content"] = None
  return json.dumps(record) + "\n"


def _query(w: _Writer, rng: random.Random, dataset: str, task_id: int, qid_n: int,
           positives: list[str], image_kind: str, missing_image: bool = False) -> str:
  """One query line; its modality is the task's query side."""
  modality = mbeir.TASK_MODALITIES[task_id][0]
  text = draw_text(rng, DATASET_STYLE[dataset][0]) if "text" in modality else None
  image = (w.image(dataset, image_kind, qid_n, missing=missing_image)
           if "image" in modality else None)
  ds = mbeir.DATASET_IDS[dataset]
  return json.dumps({"qid": f"{ds}:{qid_n}", "query_txt": text, "query_img_path": image,
                     "query_modality": modality, "query_src_content": None,
                     "pos_cand_list": positives, "neg_cand_list": [], "task_id": task_id}) + "\n"


def _write_test(w: _Writer) -> dict:
  """Local pools, the union test pool, test queries and qrels; returns counts per task."""
  counts = {}
  for dataset, tasks in _by_dataset():
    ds, next_did, next_qid = mbeir.DATASET_IDS[dataset], 1, 1
    for task, _, n_test, n_pool in tasks:
      rng = random.Random(f"{w.seed}:{task.name}")
      pool, queries = scaled(n_pool, w.scale), scaled(n_test, w.scale)
      first = next_did
      cand_modality = mbeir.TASK_MODALITIES[task.task_id][1]
      for n in range(first, first + pool):
        bad = task.name == "webqa_task1" and n == first
        line = _candidate(w, rng, dataset, cand_modality, n, "cand", empty_text=bad)
        where = w.write(task.pool_file, line)
        w.write(mbeir.UNION_TEST_POOL_FILE, line)
        if bad:
          w.bad.append(dict(kind="empty_text", file=task.pool_file, line=where, id=f"{ds}:{n}"))
      next_did += pool
      # MSCOCO task 3 has five caption positives per image query (the real data's shape).
      per_query = 5 if task.name == "mscoco_task3" else 1
      for i in range(queries):
        positives = [f"{ds}:{first + (i * per_query + j) % pool}" for j in range(per_query)]
        bad = task.name == "cirr_task7" and i == 0
        line = _query(w, rng, dataset, task.task_id, next_qid, positives, "query_test", bad)
        where = w.write(task.query_file, line)
        if bad:
          w.bad.append(dict(kind="missing_image", file=task.query_file, line=where,
                            id=f"{ds}:{next_qid}"))
        for did in positives:
          w.write(task.qrels_file, f"{ds}:{next_qid} 0 {did} 1 {task.task_id}\n")
        next_qid += 1
      counts[task.name] = dict(test=queries, pool=pool)
  return counts


def train_query_file(dataset: str) -> str:
  """A dataset's training query file under the root (UniIR's name, no task suffix)."""
  return f"query/train/mbeir_{dataset.lower()}_train.jsonl"


def _write_train(w: _Writer) -> dict:
  """Per-dataset training queries (their tasks interleaved), the union training pool (one
  positive per query) and training qrels; returns the query count per dataset."""
  counts = {}
  for dataset, tasks in _by_dataset():
    ds = mbeir.DATASET_IDS[dataset]
    rng = random.Random(f"{w.seed}:{dataset}:train")
    left = [scaled(n_train, w.scale) for _, n_train, _, _ in tasks]
    counts[dataset] = sum(left)
    rel = train_query_file(dataset)
    empty_done = dataset != "WebQA"  # The first WebQA text candidate gets an empty text.
    for qid_n in range(1, sum(left) + 1):
      k = rng.choices(range(len(tasks)), weights=left)[0]  # Interleaved, exact counts.
      left[k] -= 1
      task_id = tasks[k][0].task_id
      did_n = _TRAIN_DID_OFFSET + qid_n
      empty = not empty_done and task_id == 1
      empty_done = empty_done or empty
      line = _candidate(w, rng, dataset, mbeir.TASK_MODALITIES[task_id][1], did_n, "train_cand",
                        empty_text=empty)
      where = w.write(mbeir.UNION_TRAIN_POOL_FILE, line)
      if empty:
        w.bad.append(dict(kind="empty_text", file=mbeir.UNION_TRAIN_POOL_FILE, line=where,
                          id=f"{ds}:{did_n}"))
      missing = dataset == "CIRR" and qid_n == 1
      where = w.write(rel, _query(w, rng, dataset, task_id, qid_n, [f"{ds}:{did_n}"],
                                  "query_train", missing))
      if missing:
        w.bad.append(dict(kind="missing_image", file=rel, line=where, id=f"{ds}:{qid_n}"))
      w.write(f"qrels/train/mbeir_{dataset.lower()}_train_qrels.txt",
              f"{ds}:{qid_n} 0 {ds}:{did_n} 1 {task_id}\n")
  return counts


def _write_instructions(w: _Writer) -> None:
  """The instructions TSV (header + one row per task pair), with made-up prompts."""
  w.write(mbeir.INSTRUCTIONS_FILE, "query_modality\tcand_modality\tdataset\tdataset_id\t"
          "prompt_1\tprompt_2\tprompt_3\tprompt_4\n")
  for task in mbeir.EVAL_TASKS:
    q, c = mbeir.TASK_MODALITIES[task.task_id]
    prompts = [f"Retrieve the {c.replace(',', ' and ')} from {task.dataset} {verb} this "
               f"{q.replace(',', ' and ')}." for verb in ("for", "that matches", "best fitting",
                                                          "answering")]
    w.write(mbeir.INSTRUCTIONS_FILE, "\t".join([q, c, task.dataset,
                                                str(task.dataset_id), *prompts]) + "\n")


def write_root(out: str, scale: float, seed: int = 0) -> dict:
  """Writes the root at fraction `scale` into `out` (replacing a partial one) and returns its
  manifest (also `out/scale_root.json`). A root whose manifest names the same scale and seed
  is reused as it is.

  Returns:
    {"scale", "seed", "tasks": {name: {"test", "pool"}}, "train": {dataset: queries},
     "union_test_pool", "images", "bad_rows": [{kind, file, line, id}], "bytes_written"}.
  """
  manifest_path = os.path.join(out, MANIFEST)
  if os.path.exists(manifest_path):
    with open(manifest_path) as f:
      manifest = json.load(f)
    if manifest["scale"] == scale and manifest["seed"] == seed:
      return manifest
    raise ValueError(f"{out} holds a root at scale {manifest['scale']}, seed "
                     f"{manifest['seed']}; asked for {scale}, {seed}")
  tmp = out.rstrip("/") + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  w = _Writer(tmp, scale, seed)
  try:
    _write_instructions(w)
    tasks = _write_test(w)
    train = _write_train(w)
  finally:
    w.close()
  manifest = dict(scale=scale, seed=seed, tasks=tasks, train=train,
                  union_test_pool=sum(t["pool"] for t in tasks.values()), images=w.images,
                  bad_rows=w.bad, bytes_written=_bytes_under(tmp))
  with open(os.path.join(tmp, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, out)
  return manifest


def _bytes_under(root: str) -> int:
  """Bytes of the files under `root`, each hard-linked file counted once."""
  seen, total = set(), 0
  for folder, _, names in os.walk(root):
    for name in names:
      st = os.stat(os.path.join(folder, name))
      if st.st_ino not in seen:
        seen.add(st.st_ino)
        total += st.st_size
  return total


def main(argv):
  del argv
  manifest = write_root(flags.FLAGS.out, flags.FLAGS.scale, flags.FLAGS.seed)
  keys = ("scale", "union_test_pool", "images", "bytes_written")
  print(json.dumps({k: manifest[k] for k in keys}))


if __name__ == "__main__":
  # Defined here, not on import: benchmarks/scale.py imports this module and has its own flags.
  flags.DEFINE_float("scale", 0.001, "Fraction F of M-BEIR's real counts.")
  flags.DEFINE_string("out", None, "Root directory to write.")
  flags.DEFINE_integer("seed", 0, "Seed of every drawn length and word.")
  flags.mark_flags_as_required(["out"])
  app.run(main)
