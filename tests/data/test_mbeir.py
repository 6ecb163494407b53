"""Tests of trace_jax.data.mbeir on the `mbeir_mini` fixture (real M-BEIR layout, tiny content).

The fixture lives in `tests/fixtures/mbeir_mini`; its README lists the traps checked here.
Malformed inputs are written into `tmp_path`. No image is decoded.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import pytest

from tests.fixtures import MBEIR_MINI
from trace_jax.data import instructions as instruction_lib
from trace_jax.data import mbeir

ROOT = MBEIR_MINI
FIXTURE_TASKS = {  # name -> (#queries, #pool candidates, pool modality)
    "mscoco_task0": (4, 12, "image"),
    "mscoco_task3": (4, 13, "text"),
    "cirr_task7": (4, 12, "image"),
    "oven_task6": (4, 12, "text"),
}


def _queries(name: str) -> dict[str, mbeir.Query]:
  return {q.qid: q for q in mbeir.load_queries(mbeir.task_files(ROOT, name).queries)}


@pytest.fixture(scope="module")
def instructions() -> instruction_lib.InstructionTable:
  return instruction_lib.load_instructions(mbeir.instructions_file(ROOT))


# ------------------------------------------------------------------------------- the table


def test_eval_tasks_table():
  assert len(mbeir.EVAL_TASKS) == 16
  assert len({t.name for t in mbeir.EVAL_TASKS}) == 16
  assert mbeir.EVAL_TASKS[0].name == "visualnews_task0"
  assert mbeir.EVAL_TASKS[-1].name == "infoseek_task8"
  ten = {t.name for t in mbeir.EVAL_TASKS if t.headline_k == 10}
  assert ten == {"fashion200k_task0", "fashion200k_task3", "fashioniq_task7"}
  assert all(t.headline_k in (5, 10) for t in mbeir.EVAL_TASKS)
  by_name = mbeir.EVAL_TASKS_BY_NAME
  assert by_name["mscoco_task3"].pool_file == (
      "cand_pool/local/mbeir_mscoco_task3_test_cand_pool.jsonl")
  assert by_name["cirr_task7"].pool_file == "cand_pool/local/mbeir_cirr_task7_cand_pool.jsonl"
  assert by_name["oven_task6"].query_file == "query/test/mbeir_oven_task6_test.jsonl"
  assert by_name["oven_task6"].qrels_file == "qrels/test/mbeir_oven_task6_test_qrels.txt"
  assert by_name["infoseek_task6"].dataset_id == 6
  assert mbeir.DATASET_IDS["MSCOCO"] == 9 and mbeir.DATASET_IDS["CIRR"] == 8
  assert sorted(mbeir.DATASET_IDS.values()) == list(range(11))  # 10: the generated demo world.
  assert 5 not in {t.task_id for t in mbeir.EVAL_TASKS}


# ------------------------------------------------------------------------------- the fixture


@pytest.mark.parametrize("name", sorted(FIXTURE_TASKS))
def test_counts_modalities_and_qrels_per_task(name):
  n_queries, n_pool, modality = FIXTURE_TASKS[name]
  files = mbeir.task_files(ROOT, name)
  queries = mbeir.load_queries(files.queries)
  pool = mbeir.load_pool(files.pool)
  qrels = mbeir.load_qrels(files.qrels)
  assert len(queries) == n_queries and len(pool) == n_pool
  assert {c.modality for c in pool.values()} == {modality}
  task = mbeir.EVAL_TASKS_BY_NAME[name]
  assert all(q.task_id == task.task_id and q.dataset_id == task.dataset_id for q in queries)
  assert all(instruction_lib.target_modality(q.task_id) == modality for q in queries)
  assert qrels == {q.qid: set(q.pos_cand_list) for q in queries}


def test_ids_are_strings_and_namespaces_stay_separate():
  queries = _queries("mscoco_task0")
  pool = mbeir.load_pool(mbeir.task_files(ROOT, "mscoco_task0").pool)
  assert all(isinstance(q.qid, str) for q in queries.values())
  assert all(isinstance(d, str) for q in queries.values() for d in q.pos_cand_list)
  assert queries["9:4"].pos_cand_list == ("9:4",)  # same string, different objects
  assert queries["9:2"].pos_cand_list == ("9:1",)
  assert isinstance(pool["9:4"], mbeir.Candidate) and pool["9:4"].image_path is not None
  assert queries["9:4"].text == "A blue square on a white background."


def test_two_positive_query():
  query = _queries("mscoco_task3")["9:3"]
  assert query.pos_cand_list == ("9:2", "9:3")
  assert query.modality == "image" and query.text is None
  qrels = mbeir.load_qrels(mbeir.task_files(ROOT, "mscoco_task3").qrels)
  assert qrels["9:3"] == {"9:2", "9:3"}


def test_src_content_stays_a_json_string():
  query = _queries("oven_task6")["5:311"]
  assert isinstance(query.src_content, str)
  assert json.loads(query.src_content)["entity_id"] == "Q243"
  assert _queries("mscoco_task0")["9:4"].src_content is None


def test_union_pool_mixes_modalities_in_sorted_order():
  pool = mbeir.load_pool(mbeir.union_test_pool_file(ROOT))
  assert len(pool) == 49
  assert {c.modality for c in pool.values()} == {"image", "text"}
  keys = [tuple(map(int, did.split(":"))) for did in pool]
  assert keys == sorted(keys)
  local = {}
  for name in FIXTURE_TASKS:
    local.update(mbeir.load_pool(mbeir.task_files(ROOT, name).pool))
  assert local == pool


def test_union_train_split():
  files = mbeir.union_train_files(ROOT)
  assert files.qrels is None
  queries = mbeir.load_queries(files.queries)
  pool = mbeir.load_pool(files.pool)
  assert len(queries) == 5
  assert len({q.dataset_id for q in queries}) > 1
  cirr = [q for q in queries if q.dataset_id == mbeir.DATASET_IDS["CIRR"]]
  assert len(cirr) == 1 and cirr[0].task_id == 7
  assert cirr[0].neg_cand_list == ("8:20002",)
  assert all(d in pool for q in queries for d in q.pos_cand_list + q.neg_cand_list)


def test_task_files_missing_and_unknown(tmp_path):
  with pytest.raises(FileNotFoundError, match="mbeir_visualnews_task0_test.jsonl"):
    mbeir.task_files(ROOT, "visualnews_task0")
  with pytest.raises(KeyError, match="nope_task0"):
    mbeir.task_files(ROOT, "nope_task0")
  with pytest.raises(FileNotFoundError, match="query_instructions.tsv"):
    mbeir.instructions_file(str(tmp_path))


# ------------------------------------------------------------------------------- instructions


def test_instruction_table_keys_and_dropped_empty_cell(instructions):
  assert len(instructions) == 16
  assert "9, text, image" in instructions and "8, image,text, image" in instructions
  assert len(instructions["8, image,text, image"]) == 3
  assert all(p for prompts in instructions.values() for p in prompts)


@pytest.mark.parametrize("name, qid, expected", [
    ("mscoco_task0", "9:4",
     "Find me an everyday image that matches the given caption. "
     "A blue square on a white background."),
    ("mscoco_task3", "9:3", "Find an image caption describing the following everyday image."),
    ("cirr_task7", "8:12",
     "Retrieve a day-to-day image that aligns with the modification instructions of the "
     "provided image. Show two of them instead of one."),
    ("oven_task6", "5:311",
     "Retrieve a Wikipedia paragraph that provides an answer to the given query about the "
     "image. What is the name of this building?"),
])
def test_query_text_with_first_instruction(instructions, name, qid, expected):
  query = _queries(name)[qid]
  cand_modality = instruction_lib.target_modality(query.task_id)
  assert instruction_lib.query_text_with_instruction(query, cand_modality, instructions) == expected


def test_random_instruction_is_seeded_and_skips_empty_cells(instructions):
  query = _queries("cirr_task7")["8:12"]
  prompts = instructions["8, image,text, image"]
  draws = [instruction_lib.instruction_for(query, "image", instructions, mode="random",
                                           rng=random.Random(seed)) for seed in range(40)]
  assert set(draws) == {instruction_lib.format_string(p) for p in prompts}
  again = [instruction_lib.instruction_for(query, "image", instructions, mode="random",
                                           rng=random.Random(seed)) for seed in range(40)]
  assert draws == again
  with pytest.raises(ValueError, match="rng"):
    instruction_lib.instruction_for(query, "image", instructions, mode="random")
  with pytest.raises(ValueError, match="mode"):
    instruction_lib.instruction_for(query, "image", instructions, mode="last")
  with pytest.raises(KeyError, match="8, image,text, text.*8:12"):
    instruction_lib.instruction_for(query, "text", instructions)


def test_format_string_matches_uniir():
  assert instruction_lib.format_string(None) == ""
  assert instruction_lib.format_string('  "a cat"\r ') == "A cat."
  assert instruction_lib.format_string("why?") == "Why?"
  assert instruction_lib.format_string("Stop!") == "Stop!"
  assert instruction_lib.format_string("Prompt. lower case") == "Prompt. lower case."


# ------------------------------------------------------------------------------- images


def test_image_of_resolves_without_reading():
  query = _queries("cirr_task7")["8:12"]
  path = mbeir.image_of(query, ROOT)
  assert os.path.isabs(path) and path.endswith("cirr_images/dev/dev-1041-2-img0.jpg")
  assert os.path.isfile(path)
  assert mbeir.image_of(_queries("mscoco_task0")["9:4"], ROOT) is None
  with pytest.raises(ValueError, match="relative"):
    mbeir.resolve_image(ROOT, "/abs/x.jpg")


def test_missing_image_names_id_and_path(tmp_path):
  query = _queries("oven_task6")["5:311"]
  with pytest.raises(FileNotFoundError, match=r"qid 5:311.*oven_images/04/oven_04871235\.jpg"):
    mbeir.image_of(query, str(tmp_path))
  cand = mbeir.load_pool(mbeir.task_files(ROOT, "cirr_task7").pool)["8:2"]
  with pytest.raises(FileNotFoundError, match=r"did 8:2.*dev-1041-2-img1\.jpg"):
    mbeir.image_of(cand, str(tmp_path))


# ------------------------------------------------------------------------------- bad input


def _raises_at(path, line: int, pattern: str):
  """Expects an MBEIRFormatError whose message starts `path:line:` and then matches `pattern`."""
  return pytest.raises(mbeir.MBEIRFormatError, match=f"^{re.escape(str(path))}:{line}: .*{pattern}")


def _copy_with_line(tmp_path, rel: str, line_index: int, new_line: str) -> str:
  """Copies a fixture file into tmp_path with one line (0-based) replaced."""
  with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
    lines = f.read().splitlines()
  lines[line_index] = new_line
  path = tmp_path / os.path.basename(rel)
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


_QUERY_FILE = "query/test/mbeir_mscoco_task0_test.jsonl"
_POOL_FILE = "cand_pool/local/mbeir_mscoco_task0_test_cand_pool.jsonl"
_GOOD_QUERY = {"qid": "9:4", "query_txt": "x", "query_img_path": None, "query_modality": "text",
               "query_src_content": None, "pos_cand_list": ["9:4"], "neg_cand_list": [],
               "task_id": 0}


def _query_line(**changes) -> str:
  record = {**_GOOD_QUERY, **changes}
  return json.dumps({k: v for k, v in record.items() if v != "DROP"})


@pytest.mark.parametrize("line, pattern", [
    ('{"qid": "9:4", "query_txt": ', r"malformed JSON"),
    ("[1, 2]", r"JSON object"),
    (_query_line(task_id="DROP"), r"missing required key 'task_id'"),
    (_query_line(pos_cand_list="9:4"), r"'pos_cand_list' must be list"),
    (_query_line(pos_cand_list=[{"did": "9:4"}]), r"'pos_cand_list' must hold did strings"),
    (_query_line(task_id=5), r"unknown task_id 5 for qid 9:4"),
    (_query_line(task_id=True), r"'task_id' must be int"),
    (_query_line(query_modality="text,image"), r"unknown query_modality 'text,image' for qid 9:4"),
    (_query_line(task_id=3), r"task_id 3 expects 'image'"),
    (_query_line(qid="42:1"), r"unknown dataset id 42"),
    (_query_line(qid=9), r"'qid' must be str"),
    (_query_line(pos_cand_list=[]), r"empty 'pos_cand_list'"),
])
def test_bad_query_line_names_file_and_line(tmp_path, line, pattern):
  path = _copy_with_line(tmp_path, _QUERY_FILE, 2, line)
  with _raises_at(path, 3, pattern):
    mbeir.load_queries(path)


def test_bad_pool_lines(tmp_path):
  cand = {"txt": None, "img_path": "mbeir_images/x.jpg", "modality": "image", "did": "9:1"}
  path = _copy_with_line(tmp_path, _POOL_FILE, 4, json.dumps(cand))
  with _raises_at(path, 5, r"duplicate did '9:1'.*line 1"):
    mbeir.load_pool(path)
  del cand["did"]
  path = _copy_with_line(tmp_path, _POOL_FILE, 4, json.dumps(cand))
  with _raises_at(path, 5, r"missing required key 'did'"):
    mbeir.load_pool(path)
  cand.update(did="9:99", img_path=None)
  path = _copy_with_line(tmp_path, _POOL_FILE, 4, json.dumps(cand))
  with _raises_at(path, 5, r"9:99 .* no image path"):
    mbeir.load_pool(path)


def test_empty_text_is_content_not_structure(tmp_path):
  """UniIR embeds `format_string(txt or "")`: a text candidate or query with empty or null text
  loads (strict on structure, as tolerant as the reference on content)."""
  lines = [json.dumps({"txt": "", "img_path": None, "modality": "text", "did": "9:90"}),
           json.dumps({"txt": None, "img_path": None, "modality": "text", "did": "9:91"})]
  path = tmp_path / "pool.jsonl"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  pool = mbeir.load_pool(str(path))
  assert pool["9:90"].text == "" and pool["9:91"].text is None
  query = _copy_with_line(tmp_path, _QUERY_FILE, 2, _query_line(query_txt=None))
  assert mbeir.load_queries(query)[2].text is None


def test_candidate_without_src_content_key(tmp_path):
  cand = {"txt": None, "img_path": "mbeir_images/x.jpg", "modality": "image", "did": "0:888364"}
  path = tmp_path / "pool.jsonl"
  path.write_text(json.dumps(cand) + "\n", encoding="utf-8")
  assert mbeir.load_pool(str(path))["0:888364"].src_content is None


@pytest.mark.parametrize("line, pattern", [
    ("9:4 0 9:4 1", r"expected 5 columns"),
    ("9:4 0 9:4 one 0", r"must be integers"),
    ("9-4 0 9:4 1 0", r"'qid' must look like"),
])
def test_bad_qrels_line_names_file_and_line(tmp_path, line, pattern):
  path = _copy_with_line(tmp_path, "qrels/test/mbeir_mscoco_task0_test_qrels.txt", 1, line)
  with _raises_at(path, 2, pattern):
    mbeir.load_qrels(path)


def test_qrels_keep_only_positive_relevance(tmp_path):
  path = tmp_path / "qrels.txt"
  path.write_text("9:1 0 9:1 1 0\n9:1 0 9:1 1 0\n9:1 0 9:7 0 0\n9:2 0 9:3 0 0\n")
  assert mbeir.load_qrels(str(path)) == {"9:1": {"9:1"}}


def test_bad_instruction_rows(tmp_path):
  header = "query_modality\tcand_modality\tdataset\tdataset_id\tprompt_1\n"
  path = tmp_path / "query_instructions.tsv"
  path.write_text(header + "text\timage\tMSCOCO\t9\t\t\n")
  with _raises_at(path, 2, r"no prompt"):
    instruction_lib.load_instructions(str(path))
  path.write_text(header + "text\timage\tMSCOCO\t9\ta\ntext\timage\tMSCOCO\t9\tb\n")
  with _raises_at(path, 3, r"duplicate .*'9, text, image'"):
    instruction_lib.load_instructions(str(path))


def test_task_files_on_a_copy_names_the_missing_file(tmp_path):
  root = tmp_path / "M-BEIR"
  for rel in ("query", "cand_pool", "qrels"):
    shutil.copytree(os.path.join(ROOT, rel), root / rel)
  assert mbeir.task_files(str(root), "oven_task6").pool.startswith(str(root))
  os.remove(root / "qrels/test/mbeir_oven_task6_test_qrels.txt")
  with pytest.raises(FileNotFoundError, match="qrels/test/mbeir_oven_task6_test_qrels.txt"):
    mbeir.task_files(str(root), "oven_task6")
