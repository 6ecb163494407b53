"""Readers for M-BEIR and M-BEIR-CoT exactly as distributed on Hugging Face (`TIGER-Lab/M-BEIR`).

What this is: strict parsers for the query JSONL, candidate-pool JSONL and qrels files; the table
of the 16 evaluation tasks; and path helpers that find a task's files and a record's image under
an M-BEIR root (the instruction TSV and UniIR's rule: `instructions.py`). The field by
field spec is `shared/MBEIR_FORMAT.md`; the reference code is TIGER-AI-Lab/UniIR @98dc570
(`src/data/mbeir_dataset.py`, `src/data/preprocessing/utils.py`, `src/common/mbeir_retriever.py`).

What this is not: no image decoding or resizing (`image.py`), no tokenization or chat templates
(`tokenizer.py`, `prompts.py`), no batching (`pipeline.py`) and no recall computation
(`eval/metrics.py`). Images are never opened here; `image_of` only resolves and checks a path.

Ids stay strings (`"ds:n"`). Query ids and candidate ids are separate namespaces: query `9:4` and
candidate `9:4` are different objects, so never key one dict on both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Collection, Iterator

# UniIR `DATASET_IDS` (src/data/preprocessing/utils.py): dataset name -> id prefix.
DATASET_IDS: dict[str, int] = {
    "VisualNews": 0,
    "Fashion200K": 1,
    "WebQA": 2,
    "EDIS": 3,
    "NIGHTS": 4,
    "OVEN": 5,
    "INFOSEEK": 6,
    "FashionIQ": 7,
    "CIRR": 8,
    "MSCOCO": 9,
    # Not M-BEIR: the generated demo world (trace_jax/data/synthetic.py) in the same format.
    "Synthetic": 10,
}

# UniIR `MBEIR_TASK`, inverted: task id -> (query modality, candidate modality). Task 5
# ("image -> text,image") is declared invalid by UniIR and never occurs, so it is left out.
TASK_MODALITIES: dict[int, tuple[str, str]] = {
    0: ("text", "image"),
    1: ("text", "text"),
    2: ("text", "image,text"),
    3: ("image", "text"),
    4: ("image", "image"),
    6: ("image,text", "text"),
    7: ("image,text", "image"),
    8: ("image,text", "image,text"),
}

MODALITIES = ("text", "image", "image,text")


_ID_RE = re.compile(r"(\d+):(\d+)")
_DID_SPAN = 10_000_000  # UniIR's `hash_did` multiplier.
INSTRUCTIONS_FILE = os.path.join("instructions", "query_instructions.tsv")


class MBEIRFormatError(ValueError):
  """A file does not follow the M-BEIR format; the message starts with `path:line:`."""


@dataclasses.dataclass(frozen=True)
class Query:
  """One line of a query JSONL file; text is raw (no `format_string`)."""
  qid: str  # "ds:n", in the query namespace.
  text: str | None  # `query_txt`; None for image-only queries.
  image_path: str | None  # `query_img_path`, relative to the M-BEIR root.
  modality: str  # "text", "image" or "image,text".
  task_id: int  # UniIR task id: 0-4 or 6-8.
  pos_cand_list: tuple[str, ...]  # dids; OVEN ones may carry the INFOSEEK prefix 6.
  neg_cand_list: tuple[str, ...]  # dids; usually empty, unused by evaluation.
  src_content: str | None  # `query_src_content`, a JSON-encoded string left undecoded.
  dataset_id: int  # The qid's prefix; it selects the instruction row.


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One line of a candidate-pool JSONL file; text is raw (no `format_string`)."""
  did: str  # "ds:n", in the candidate namespace.
  text: str | None  # `txt`; None for image-only candidates.
  image_path: str | None  # `img_path`, relative to the M-BEIR root.
  modality: str  # "text", "image" or "image,text".
  src_content: str | None  # A JSON-encoded string left undecoded; the key is absent on VisualNews.
  dataset_id: int  # The did's prefix.


@dataclasses.dataclass(frozen=True)
class EvalTask:
  """One of the 16 M-BEIR test triples; file names are relative to the M-BEIR root."""
  name: str  # UniIR's task name, e.g. "mscoco_task0".
  dataset: str  # A key of `DATASET_IDS`.
  task_id: int
  query_file: str  # Test queries.
  pool_file: str  # Local candidate pool.
  qrels_file: str  # Test qrels.
  headline_k: int  # k of the reported Recall@k: 5, or 10 for the fashion tasks.

  @property
  def dataset_id(self) -> int:
    """The id prefix of this task's dataset."""
    return DATASET_IDS[self.dataset]


@dataclasses.dataclass(frozen=True)
class TaskFiles:
  """Absolute paths of one split's files, all checked to exist."""
  queries: str
  pool: str
  qrels: str | None  # None for a split distributed without qrels (union_train).


def _eval_task(name: str, dataset: str, task_id: int, headline_k: int = 5) -> EvalTask:
  """Builds an `EvalTask` with UniIR's file names (MBEIR_FORMAT.md §1)."""
  # Only MSCOCO has different val and test pools, so only its local pool names carry the split.
  pool_stem = f"{name}_test" if dataset == "MSCOCO" else name
  return EvalTask(name, dataset, task_id,
                  query_file=f"query/test/mbeir_{name}_test.jsonl",
                  pool_file=f"cand_pool/local/mbeir_{pool_stem}_cand_pool.jsonl",
                  qrels_file=f"qrels/test/mbeir_{name}_test_qrels.txt",
                  headline_k=headline_k)


# The 16 evaluation triples in UniIR's canonical order (the order of its result TSV).
EVAL_TASKS: tuple[EvalTask, ...] = (
    _eval_task("visualnews_task0", "VisualNews", 0),
    _eval_task("mscoco_task0", "MSCOCO", 0),
    _eval_task("fashion200k_task0", "Fashion200K", 0, headline_k=10),
    _eval_task("webqa_task1", "WebQA", 1),
    _eval_task("edis_task2", "EDIS", 2),
    _eval_task("webqa_task2", "WebQA", 2),
    _eval_task("visualnews_task3", "VisualNews", 3),
    _eval_task("mscoco_task3", "MSCOCO", 3),
    _eval_task("fashion200k_task3", "Fashion200K", 3, headline_k=10),
    _eval_task("nights_task4", "NIGHTS", 4),
    _eval_task("oven_task6", "OVEN", 6),
    _eval_task("infoseek_task6", "INFOSEEK", 6),
    _eval_task("fashioniq_task7", "FashionIQ", 7, headline_k=10),
    _eval_task("cirr_task7", "CIRR", 7),
    _eval_task("oven_task8", "OVEN", 8),
    _eval_task("infoseek_task8", "INFOSEEK", 8),
)

EVAL_TASKS_BY_NAME: dict[str, EvalTask] = {t.name: t for t in EVAL_TASKS}

UNION_TRAIN_QUERY_FILE = "query/union_train/mbeir_union_up_train.jsonl"
UNION_TRAIN_POOL_FILE = "cand_pool/global/mbeir_union_train_cand_pool.jsonl"
UNION_TEST_POOL_FILE = "cand_pool/global/mbeir_union_test_cand_pool.jsonl"

# ----------------------------------------------------------------------------------- JSONL records


def read_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields `(line_number, object)` for each line of a JSONL file (1-based; blank lines skipped).

  Raises:
    MBEIRFormatError: a line is not valid JSON or not a JSON object (names file and line).
  """
  for line_number, _, record in read_jsonl_at(path):
    yield line_number, record


def read_jsonl_at(path: str) -> Iterator[tuple[int, int, dict[str, Any]]]:
  """`read_jsonl` with each line's byte offset: `(line_number, offset, object)`; `read_line_at`
  reads the line again later."""
  with open(path, "rb") as f:
    offset = 0
    for line_number, line in enumerate(f, start=1):
      start, offset = offset, offset + len(line)
      if line.strip():
        yield line_number, start, _decode(line, f"{path}:{line_number}")


def read_line_at(path: str, offset: int, line_number: int) -> dict[str, Any]:
  """The object on the line at byte `offset` of a JSONL file (found by `read_jsonl_at`);
  `line_number` names it in errors."""
  with open(path, "rb") as f:
    f.seek(offset)
    return _decode(f.readline(), f"{path}:{line_number}")


def _decode(line: bytes, where: str) -> dict[str, Any]:
  try:
    record = json.loads(line)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise MBEIRFormatError(f"{where}: malformed JSON: {getattr(e, 'msg', e)}") from e
  if not isinstance(record, dict):
    raise MBEIRFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
  return record


_MISSING = object()


def _field(record: dict[str, Any], key: str, types: tuple[type, ...], where: str,
           default: Any = _MISSING) -> Any:
  """Returns `record[key]` after checking its presence and JSON type; `where` is `path:line`."""
  if key not in record:
    if default is not _MISSING:
      return default
    raise MBEIRFormatError(f"{where}: missing required key {key!r}")
  value = record[key]
  # bool is an int subclass in Python but a different JSON type.
  if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
    names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
    raise MBEIRFormatError(f"{where}: key {key!r} must be {names}, got {value!r}")
  return value


def _id_list(record: dict[str, Any], key: str, where: str,
             default: Any = _MISSING) -> tuple[str, ...]:
  """Returns a list of did strings as a tuple, checking each one."""
  values = _field(record, key, (list,), where, default)
  for value in values:
    if not isinstance(value, str):
      raise MBEIRFormatError(f"{where}: key {key!r} must hold did strings, got {value!r}")
    _dataset_of(value, key, where)
  return tuple(values)


def _dataset_of(item_id: str, key: str, where: str) -> int:
  """Parses the dataset prefix of a `"ds:n"` id, which must be a known dataset id."""
  match = _ID_RE.fullmatch(item_id)
  if match is None:
    raise MBEIRFormatError(f"{where}: key {key!r} must look like 'dataset_id:n', got {item_id!r}")
  dataset_id = int(match.group(1))
  if dataset_id not in DATASET_IDS.values():
    raise MBEIRFormatError(f"{where}: unknown dataset id {dataset_id} in {key} {item_id!r}")
  return dataset_id


def _modality(record: dict[str, Any], key: str, item_id: str, where: str) -> str:
  """Returns a modality field, which must be one of `MODALITIES`."""
  modality = _field(record, key, (str,), where)
  if modality not in MODALITIES:
    raise MBEIRFormatError(f"{where}: unknown {key} {modality!r} for {item_id} "
                           f"(expected one of {MODALITIES})")
  return modality


def _check_image_path(modality: str, image_path: str | None, item_id: str, where: str) -> None:
  """An item whose modality names an image needs an image path (structure). Text is content:
  a null or empty text is accepted whatever the modality, as UniIR and LamRA accept it (they
  embed `format_string(txt or "")`)."""
  if "image" in modality.split(",") and not image_path:
    raise MBEIRFormatError(f"{where}: {item_id} has modality {modality!r} but no image path")


def parse_query(record: dict[str, Any], where: str) -> Query:
  """Builds a `Query` from one decoded line; `where` (`"path:line"`) prefixes every error.

  Raises:
    MBEIRFormatError: a key is missing or mistyped, an id is malformed, the task id is unknown
      (or 5), the modality is unknown or disagrees with the task.
  """
  qid = _field(record, "qid", (str,), where)
  dataset_id = _dataset_of(qid, "qid", where)
  text = _field(record, "query_txt", (str, type(None)), where)
  image_path = _field(record, "query_img_path", (str, type(None)), where)
  modality = _modality(record, "query_modality", f"qid {qid}", where)
  task_id = _field(record, "task_id", (int,), where)
  if task_id not in TASK_MODALITIES:
    raise MBEIRFormatError(f"{where}: unknown task_id {task_id} for qid {qid} "
                           f"(expected one of {sorted(TASK_MODALITIES)})")
  if TASK_MODALITIES[task_id][0] != modality:
    raise MBEIRFormatError(f"{where}: qid {qid} has query_modality {modality!r} but task_id "
                           f"{task_id} expects {TASK_MODALITIES[task_id][0]!r}")
  pos = _id_list(record, "pos_cand_list", where)
  if not pos:
    raise MBEIRFormatError(f"{where}: qid {qid} has an empty 'pos_cand_list'")
  _check_image_path(modality, image_path, qid, where)
  return Query(
      qid=qid,
      text=text,
      image_path=image_path,
      modality=modality,
      task_id=task_id,
      pos_cand_list=pos,
      neg_cand_list=_id_list(record, "neg_cand_list", where, default=[]),
      src_content=_field(record, "query_src_content", (str, type(None)), where, default=None),
      dataset_id=dataset_id,
  )


def parse_candidate(record: dict[str, Any], where: str) -> Candidate:
  """Builds a `Candidate` from one decoded line; `where` (`"path:line"`) prefixes every error.

  Raises:
    MBEIRFormatError: a key is missing or mistyped, the did is malformed, the modality is unknown.
  """
  did = _field(record, "did", (str,), where)
  dataset_id = _dataset_of(did, "did", where)
  text = _field(record, "txt", (str, type(None)), where)
  image_path = _field(record, "img_path", (str, type(None)), where)
  modality = _modality(record, "modality", f"did {did}", where)
  _check_image_path(modality, image_path, did, where)
  return Candidate(
      did=did,
      text=text,
      image_path=image_path,
      modality=modality,
      # Absent on VisualNews lines, so it is optional.
      src_content=_field(record, "src_content", (str, type(None)), where, default=None),
      dataset_id=dataset_id,
  )


def load_queries(path: str) -> list[Query]:
  """Reads a query JSONL file, in file order; qids may repeat (the up-sampled union_train does).

  Raises:
    MBEIRFormatError: a malformed line (names file and line).
  """
  return [parse_query(record, f"{path}:{n}") for n, record in read_jsonl(path)]


def load_pool(path: str) -> dict[str, Candidate]:
  """Reads a candidate-pool JSONL file into `{did: Candidate}`, keeping file order.

  Raises:
    MBEIRFormatError: a malformed line, or a did seen before (names file, both lines and the did).
  """
  return load_pool_subset(path, None)


def load_pool_subset(path: str, needed: Collection[str] | None) -> dict[str, Candidate]:
  """The candidates of a pool file whose dids are in `needed` (None: every line's), in file
  order: one pass that parses only those lines' records into `Candidate`s (a training split
  names a few of the union pool's 1.1M candidates).

  Raises:
    MBEIRFormatError: a malformed line (bad JSON anywhere; a bad candidate among those kept), or
      a kept did seen before (names file, both lines and the did).
  """
  pool: dict[str, Candidate] = {}
  first_line: dict[str, int] = {}
  for n, record in read_jsonl(path):
    if needed is not None:
      did = record.get("did")
      if not isinstance(did, str) or did not in needed:
        continue
    cand = parse_candidate(record, f"{path}:{n}")
    if cand.did in pool:
      raise MBEIRFormatError(f"{path}:{n}: duplicate did {cand.did!r} "
                             f"(first on line {first_line[cand.did]})")
    pool[cand.did] = cand
    first_line[cand.did] = n
  return pool


def load_qrels(path: str) -> dict[str, set[str]]:
  """Reads a qrels file: lines `qid 0 did relevance task_id`; keeps lines with relevance > 0.

  Matches UniIR/LamRA `load_qrel`: whitespace split, `int(relevance) > 0`, set semantics.

  Returns:
    `{qid: set of relevant dids}`; a qid with no relevant line is absent.

  Raises:
    MBEIRFormatError: a line without 5 columns, a bad id, or a non-integer relevance or task id
      (names file and line).
  """
  qrels: dict[str, set[str]] = {}
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      parts = line.split()
      if not parts:
        continue
      where = f"{path}:{n}"
      if len(parts) != 5:
        raise MBEIRFormatError(f"{where}: expected 5 columns 'qid 0 did relevance task_id', "
                               f"got {len(parts)}: {line.strip()!r}")
      qid, _, did, relevance, task_id = parts
      _dataset_of(qid, "qid", where)
      _dataset_of(did, "did", where)
      if not (relevance.lstrip("-").isdigit() and task_id.isdigit()):
        raise MBEIRFormatError(f"{where}: relevance and task_id must be integers, "
                               f"got {relevance!r} and {task_id!r}")
      if int(relevance) > 0:
        qrels.setdefault(qid, set()).add(did)
  return qrels


def did_key(did: str) -> int:
  """A candidate id as one integer, UniIR's `hash_did` (`dataset_id * 10_000_000 + n`): equal for
  equal dids, distinct for distinct ones (every real M-BEIR `n` is below 10 million), and within
  int32 for the known dataset ids, so a batch can carry it.

  Raises:
    ValueError: `did` is not `"ds:n"` or its `n` is 10 million or more (it would collide).
  """
  match = _ID_RE.fullmatch(did)
  if match is None or int(match.group(2)) >= _DID_SPAN:
    raise ValueError(f"candidate id {did!r} is not 'dataset_id:n' with n < {_DID_SPAN}")
  return int(match.group(1)) * _DID_SPAN + int(match.group(2))


# -------------------------------------------------------------------------------- paths


def _under(root: str, rel: str) -> str:
  """Absolute path of `rel` under `root`; raises FileNotFoundError naming it if it is no file."""
  path = os.path.join(os.path.abspath(root), rel)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"expected M-BEIR file not found: {path}")
  return path


def task_files(root: str, name: str) -> TaskFiles:
  """Locates one of the 16 evaluation tasks' test files under an M-BEIR root.

  Args:
    root: the M-BEIR root (UniIR's `mbeir_data_dir`).
    name: a task name from `EVAL_TASKS`, e.g. `"mscoco_task0"`.

  Returns:
    Absolute paths of its query, local pool and qrels files.

  Raises:
    KeyError: an unknown task name.
    FileNotFoundError: a file is missing (names the expected path).
  """
  if name not in EVAL_TASKS_BY_NAME:
    raise KeyError(f"unknown M-BEIR task {name!r}; known: {sorted(EVAL_TASKS_BY_NAME)}")
  task = EVAL_TASKS_BY_NAME[name]
  return TaskFiles(_under(root, task.query_file), _under(root, task.pool_file),
                   _under(root, task.qrels_file))


def union_train_files(root: str) -> TaskFiles:
  """The up-sampled union training queries and their pool (no qrels are distributed for it)."""
  return TaskFiles(_under(root, UNION_TRAIN_QUERY_FILE), _under(root, UNION_TRAIN_POOL_FILE),
                   qrels=None)


def union_test_pool_file(root: str) -> str:
  """The global ("M-BEIR", 5.6M) test pool: the union of the 16 local test pools."""
  return _under(root, UNION_TEST_POOL_FILE)


def instructions_file(root: str) -> str:
  """`instructions/query_instructions.tsv` under the root."""
  return _under(root, INSTRUCTIONS_FILE)


def resolve_image(root: str, image_path: str) -> str:
  """Absolute path of an image path from the data, which is relative to the M-BEIR root.

  Raises:
    ValueError: `image_path` is empty or absolute.
    FileNotFoundError: the file does not exist (names the path).
  """
  if not image_path or os.path.isabs(image_path):
    raise ValueError(f"image path must be relative to the M-BEIR root, got {image_path!r}")
  path = os.path.abspath(os.path.join(root, image_path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"M-BEIR image not found: {path}")
  return path


def image_of(item: Query | Candidate, root: str) -> str | None:
  """Absolute image path of a query or candidate, or None when it has no image.

  Raises:
    FileNotFoundError: the image is missing (names the qid or did and the path). UniIR asserts
      the same; a blank image is never substituted.
  """
  if item.image_path is None:
    return None
  item_id = f"qid {item.qid}" if isinstance(item, Query) else f"did {item.did}"
  try:
    return resolve_image(root, item.image_path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{item_id}: {e}") from e
