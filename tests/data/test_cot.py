"""Tests of trace_jax.data.cot (format, parser, filters) and the build_cot tool.

Every input is written into `tmp_path` by the test; token counts use a whitespace `Tokenizer` stub,
except the command-line run, which trains a tiny SentencePiece model. No JAX computation runs here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from typing import Sequence

import pytest

from trace_jax.data import cot
from trace_jax.data.mbeir import MBEIRFormatError
from trace_jax.data.tokenizer import EMB_TOKEN, SentencePieceTokenizer, Tokenizer
from trace_jax.data import cot_build as build_cot

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GOOD_REASONING = ("the reference image shows a short red cotton dress with thin straps. the "
                  "request asks for the same cut in a darker colour with longer sleeves, so the "
                  "target is a navy dress.")
GOOD_ANSWER = "a long sleeved navy cotton dress"
QUERY_TEXT = "Make it navy with long sleeves."
TARGET_TEXT = "Navy long sleeve cotton dress."

# One sample per content rule that trips that rule and no other (answer, query, target as above).
TRIPS: dict[str, tuple[str, str]] = {
    cot.LENGTH: ("the dress becomes navy blue.", "a navy dress"),
    cot.REPETITION: ("the target dress is navy. " * 6, "a navy dress"),
    cot.REFUSAL: ("I'm sorry, but I cannot determine the exact colour from this image, so I will "
                  "describe the dress as it appears in the reference with longer sleeves.",
                  "a navy dress"),
    cot.NON_ENGLISH: ("на эталонном изображении показано короткое красное платье из хлопка с "
                      "тонкими бретелями а запрос просит тот же крой но темнее и с длинными "
                      "рукавами", "a navy dress"),
    cot.KEYWORD: (GOOD_REASONING, "a striped woollen scarf"),
}


class WordTokenizer:
  """The `Tokenizer` protocol over whitespace-separated words; ids are assigned on first sight."""

  def __init__(self):
    self._ids = {EMB_TOKEN: 0}

  def encode(self, text: str) -> list[int]:
    return [self._ids.setdefault(w, len(self._ids)) for w in text.split()]

  def decode(self, ids: Sequence[int]) -> str:
    words = {i: w for w, i in self._ids.items()}
    return " ".join(words[i] for i in ids)

  def token_to_id(self, token: str) -> int:
    return self._ids[token]

  @property
  def vocab_size(self) -> int:
    return len(self._ids)

  @property
  def emb_id(self) -> int:
    return self._ids[EMB_TOKEN]


def _wrap(reasoning: str, answer: str) -> str:
  return f"<reasoning>{reasoning}</reasoning><answer>{answer}</answer>"


def _reason(qid: str, output: str, task_id: int = 6) -> cot.CoTRecord:
  """A reason record the verifier believed (the content rules are what these tests probe)."""
  return cot.CoTRecord(qid=qid, task_id=task_id, route="reason", teacher_output=output,
                       confidence=0.9)


def _sample(reasoning: str, answer: str) -> cot.Sample:
  return cot.make_sample(reasoning, answer, QUERY_TEXT, TARGET_TEXT, WordTokenizer())


def _write_lines(path, lines: Sequence[object]) -> str:
  path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
  return str(path)


def _read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------- parse and strip


def test_word_tokenizer_stub_follows_the_protocol():
  assert isinstance(WordTokenizer(), Tokenizer)


def test_parse_and_strip_a_good_output():
  record = _reason("5:1", f"  <reasoning> {GOOD_REASONING}\n</reasoning>\n<answer> {GOOD_ANSWER} "
                   "</answer>\n")
  assert cot.parse_teacher_output(record.teacher_output) == (GOOD_REASONING, GOOD_ANSWER)
  assert cot.training_target(record) == f"{GOOD_REASONING} {GOOD_ANSWER}"


def test_direct_record_has_no_training_target():
  record = cot.CoTRecord(qid="9:1", task_id=0, route="direct", teacher_output=None)
  assert cot.training_target(record) is None
  assert cot.filter_record(record, "", "", WordTokenizer()) is None


@pytest.mark.parametrize("text, message", [
    (_wrap("r", "a") + "<answer>b</answer>", "exactly one <answer>, found 2"),
    ("<answer>a</answer><reasoning>r</reasoning>", "then <answer>"),
    ("<reasoning>r</reasoning> a", "exactly one <answer>, found 0"),
    ("reasoning r answer a", "exactly one <reasoning>, found 0"),
    ("Sure! " + _wrap("r", "a"), "nothing else"),
    ("<reasoning>r<answer>a</answer></reasoning>", "then <answer>"),
])
def test_malformed_outputs_fail_the_structure_rule(text, message):
  with pytest.raises(cot.CoTFilterError, match=re.escape(message)) as info:
    cot.parse_teacher_output(text)
  assert info.value.reason == cot.STRUCTURE
  assert cot.check_structure(text) == cot.STRUCTURE
  assert cot.filter_record(_reason("5:1", text), QUERY_TEXT, TARGET_TEXT, None) == cot.STRUCTURE
  with pytest.raises(cot.CoTFilterError):
    cot.training_target(_reason("5:1", text))


# ------------------------------------------------------------------------------------ filters


def test_good_sample_passes_every_rule():
  assert cot.check_structure(_wrap(GOOD_REASONING, GOOD_ANSWER)) is None
  sample = _sample(GOOD_REASONING, GOOD_ANSWER)
  assert [check(sample, cot.FilterConfig()) for check in cot.CONTENT_FILTERS] == [None] * 5
  assert cot.filter_record(_reason("5:1", _wrap(GOOD_REASONING, GOOD_ANSWER)), QUERY_TEXT,
                           TARGET_TEXT, WordTokenizer()) is None


@pytest.mark.parametrize("rule", sorted(TRIPS))
def test_each_sample_trips_exactly_its_rule(rule):
  reasoning, answer = TRIPS[rule]
  assert cot.check_structure(_wrap(reasoning, answer)) is None
  sample = _sample(reasoning, answer)
  failed = [check(sample, cot.FilterConfig()) for check in cot.CONTENT_FILTERS]
  assert [r for r in failed if r is not None] == [rule]
  record = _reason("5:1", _wrap(reasoning, answer))
  assert cot.filter_record(record, QUERY_TEXT, TARGET_TEXT, WordTokenizer()) == rule


@pytest.mark.parametrize("reasoning_words, answer_words, ok", [
    (16, 2, True), (15, 2, False), (256, 64, True), (257, 2, False), (16, 1, False),
    (16, 65, False)])
def test_length_bounds_are_inclusive(reasoning_words, answer_words, ok):
  sample = cot.make_sample(" ".join(f"w{i}" for i in range(reasoning_words)),
                           " ".join(f"a{i}" for i in range(answer_words)), "", "", None)
  assert (cot.check_length(sample) is None) == ok


def test_length_counts_tokens_of_the_given_tokenizer():
  class CharTokenizer(WordTokenizer):
    def encode(self, text: str) -> list[int]:
      return [ord(c) for c in text]

  sample = cot.make_sample("the dress becomes navy blue.", "navy", "", "", CharTokenizer())
  assert (sample.reasoning_tokens, sample.answer_tokens) == (28, 4)
  assert cot.check_length(sample) is None


def test_repetition_rule_thresholds():
  assert cot.repeated_ngram_fraction("a b c d a b c d".split(), 4) == pytest.approx(1 - 4 / 5)
  loop = _sample("the circle is red and " * 5, "a red circle")
  assert cot.repeated_ngram_fraction(("the circle is red and " * 5).split(), 4) > 0.5
  assert cot.check_repetition(loop) == cot.REPETITION
  # A short sentence (< 3 words) may repeat.
  assert cot.check_repetition(_sample("Yes. Yes. " + GOOD_REASONING, GOOD_ANSWER)) is None


def test_refusal_matches_phrases_on_word_boundaries():
  assert cot.check_refusal(_sample("As an AI\u2019s helper I can\u2019t see it.", "x")) is not None
  assert cot.check_refusal(_sample("as an aide, the man holds a cane.", "x")) is None


def test_non_english_threshold():
  assert cot.ascii_letter_fraction("Zürich") == pytest.approx(5 / 6)
  assert cot.ascii_letter_fraction("123") == 0.0
  accents = _sample("the tower stands in Zürich near the lake " * 2 + "on a clear day", "tower")
  assert cot.check_non_english(accents) is None


def test_keywords_drop_stopwords_short_words_and_case():
  assert cot.keywords("Find an IMAGE of the Navy dress, 2 of them; 2024 model") == {
      "navy", "dress", "2024", "model"}
  image_only = cot.make_sample(GOOD_REASONING, "navy dress", "Make it navy.", None, None)
  assert cot.check_keyword(image_only) is None
  via_target = cot.make_sample(GOOD_REASONING, "cotton", "Change it.", TARGET_TEXT, None)
  assert cot.check_keyword(via_target) is None


def test_rules_apply_in_order():
  # Too short and no shared keyword: length comes first.
  record = _reason("5:1", _wrap("it is a scarf.", "a woollen scarf"))
  assert cot.filter_record(record, QUERY_TEXT, TARGET_TEXT, WordTokenizer()) == cot.LENGTH
  assert cot.RULES == ("structure", "length", "repetition", "refusal", "non_english", "keyword",
                       "confidence", "unverified")


@pytest.mark.parametrize("confidence,required,reason", [
    (None, True, cot.UNVERIFIED), (None, False, None), (0.95, True, None), (0.71, True, None),
    (0.7, True, cot.CONFIDENCE), (0.2, True, cot.CONFIDENCE), (0.2, False, cot.CONFIDENCE)])
def test_confidence_rule_keeps_what_the_verifier_believes(confidence, required, reason):
  """The paper keeps samples whose verifier confidence is above 0.7; one with no confidence (its
  verification skipped or never run) fails as `unverified` while the rule is on."""
  record = cot.CoTRecord("5:1", 6, "reason", _wrap(GOOD_REASONING, GOOD_ANSWER), confidence)
  cfg = cot.FilterConfig(require_confidence=required)
  assert cot.filter_record(record, QUERY_TEXT, TARGET_TEXT, WordTokenizer(), cfg) == reason
  line = record.to_json()
  assert ("confidence" in line) == (confidence is not None)


# ------------------------------------------------------------------------------------ read_cot


def test_read_cot_reads_records_and_ignores_extra_keys(tmp_path):
  path = _write_lines(tmp_path / "cot.jsonl", [
      {"qid": "8:1", "task_id": 7, "route": "reason", "teacher_output": _wrap("r", "a"),
       "teacher": "some-model"},
      "",
      {"qid": "9:1", "task_id": 0, "route": "direct", "teacher_output": None},
  ])
  records = cot.read_cot(path)
  assert list(records) == ["8:1", "9:1"]
  assert records["8:1"] == cot.CoTRecord("8:1", 7, "reason", _wrap("r", "a"))
  assert records["9:1"].to_json() == {"qid": "9:1", "task_id": 0, "route": "direct",
                                      "teacher_output": None}
  assert cot.read_cot_numbered(path)["9:1"][0] == 3


_GOOD_LINE = {"qid": "8:1", "task_id": 7, "route": "reason", "teacher_output": "<reasoning>"}


@pytest.mark.parametrize("bad, message", [
    ('{"qid": "8:2", ', "malformed JSON"),
    ({"qid": "8:2", "task_id": 7, "route": "reason"}, "missing required key 'teacher_output'"),
    ({"task_id": 7, "route": "direct", "teacher_output": None}, "missing required key 'qid'"),
    ({"qid": "8:2", "task_id": 7, "route": "think", "teacher_output": "x"}, "key 'route'"),
    ({"qid": "8:2", "task_id": 7, "route": "reason", "teacher_output": None},
     "route 'reason' but teacher_output is None"),
    ({"qid": "8:2", "task_id": 0, "route": "direct", "teacher_output": "x"},
     "route 'direct' but a non-null teacher_output"),
    ({"qid": 82, "task_id": 7, "route": "direct", "teacher_output": None}, "key 'qid'"),
    ({"qid": "8:2", "task_id": "7", "route": "direct", "teacher_output": None}, "key 'task_id'"),
    ({"qid": "8:1", "task_id": 7, "route": "direct", "teacher_output": None},
     "duplicate qid '8:1' (first on line 1)"),
    ({"qid": "8:2", "task_id": 7, "route": "reason", "teacher_output": "x", "confidence": 1.5},
     "key 'confidence' must be a number in [0, 1]"),
])
def test_read_cot_errors_name_file_and_line(tmp_path, bad, message):
  path = _write_lines(tmp_path / "cot.jsonl", [_GOOD_LINE, bad])
  with pytest.raises(MBEIRFormatError, match=re.escape(f"{path}:2:") + ".*" + re.escape(message)):
    cot.read_cot(path)


# ---------------------------------------------------------------------------------- build_cot


def _query(qid: str, task_id: int, text: str, pos: str) -> dict:
  modality = {6: "image,text", 7: "image,text", 0: "text"}[task_id]
  image = None if modality == "text" else f"mbeir_images/q/{qid.replace(':', '_')}.jpg"
  return {"qid": qid, "query_txt": text, "query_img_path": image, "query_modality": modality,
          "query_src_content": None, "pos_cand_list": [pos], "neg_cand_list": [],
          "task_id": task_id}


def _candidate(did: str, text: str | None) -> dict:
  image = None if text else f"mbeir_images/c/{did.replace(':', '_')}.jpg"
  return {"did": did, "txt": text, "img_path": image, "modality": "text" if text else "image"}


def _world(tmp_path) -> dict[str, str]:
  """Raw CoT, queries and pool: two good reason records, one per rule, two direct records."""
  raw = [("5:1", GOOD_REASONING, GOOD_ANSWER), ("5:2", None, None)]
  trips = dict(TRIPS, **{cot.CONFIDENCE: (GOOD_REASONING, GOOD_ANSWER),
                         cot.UNVERIFIED: (GOOD_REASONING, GOOD_ANSWER)})
  qid_of = {rule: f"5:{i}" for i, rule in enumerate(cot.RULES, start=2)}
  raw += [(qid_of[rule], *trips[rule]) for rule in cot.RULES[1:]]
  lines, queries, pool = [], [], []
  for qid, reasoning, answer in raw:
    output = _wrap(reasoning, answer) if reasoning else _wrap("r", "a") + "<answer>b</answer>"
    lines.append({"qid": qid, "task_id": 6, "route": "reason", "teacher_output": output})
    if qid != qid_of[cot.UNVERIFIED]:  # Believed, but the confidence rule's record is not.
      lines[-1]["confidence"] = 0.3 if qid == qid_of[cot.CONFIDENCE] else 0.9
    queries.append(_query(qid, 6, QUERY_TEXT, f"5:{100 + len(pool)}"))
    pool.append(_candidate(f"5:{100 + len(pool)}", TARGET_TEXT))
  # Image target: the keyword must come from the query text.
  lines.append({"qid": "8:1", "task_id": 7, "route": "reason",
                "teacher_output": _wrap(GOOD_REASONING, "a navy dress with long sleeves"),
                "confidence": 0.8})
  queries.append(_query("8:1", 7, QUERY_TEXT, "8:100"))
  pool.append(_candidate("8:100", None))
  for n in (1, 2):
    lines.append({"qid": f"9:{n}", "task_id": 0, "route": "direct", "teacher_output": None})
    queries.append(_query(f"9:{n}", 0, "A dog on a beach.", f"9:{100 + n}"))
    pool.append(_candidate(f"9:{100 + n}", None))
  queries.append(queries[0])  # union_train repeats qids.
  return {"raw": _write_lines(tmp_path / "raw.jsonl", lines),
          "queries": _write_lines(tmp_path / "queries.jsonl", queries),
          "pool": _write_lines(tmp_path / "pool.jsonl", pool),
          "out": str(tmp_path / "out" / "cot.jsonl")}


def _check_outputs(paths: dict[str, str]) -> None:
  kept = _read_jsonl(paths["out"])
  assert [r["qid"] for r in kept] == ["5:1", "8:1", "9:1", "9:2"]
  assert kept[-1] == {"qid": "9:2", "task_id": 0, "route": "direct", "teacher_output": None}
  assert cot.read_cot(paths["out"])["5:1"].teacher_output == _wrap(GOOD_REASONING, GOOD_ANSWER)
  assert cot.read_cot(paths["out"])["5:1"].confidence == 0.9
  dropped = _read_jsonl(paths["out"].replace(".jsonl", ".dropped.jsonl"))
  assert [(d["qid"], d["reason"]) for d in dropped] == [
      (f"5:{i}", rule) for i, rule in enumerate(cot.RULES, start=2)]
  assert all(d["route"] == "reason" and d["task_id"] == 6 for d in dropped)


def _expected_table(out: str) -> str:
  rows = [f"{rule:<14}{1:>8}" for rule in cot.RULES]
  return "\n".join(["read 12 records", f"{'rule':<14}{'dropped':>8}", *rows,
                    f"{'total':<14}{8:>8}", f"{'route':<14}{'kept':>8}", f"{'reason':<14}{2:>8}",
                    f"{'direct':<14}{2:>8}", f"{'total':<14}{4:>8}",
                    f"wrote {out} and {out.replace('.jsonl', '.dropped.jsonl')}"])


def test_build_end_to_end(tmp_path):
  paths = _world(tmp_path)
  os.makedirs(os.path.dirname(paths["out"]))
  report = build_cot.build(paths["raw"], paths["queries"], paths["pool"], paths["out"],
                           tokenizer=WordTokenizer())
  assert report.dropped == dict.fromkeys(cot.RULES, 1)
  assert report.kept == {"reason": 2, "direct": 2}
  assert build_cot.format_report(report) == _expected_table(paths["out"])
  _check_outputs(paths)
  lenient = build_cot.build(paths["raw"], paths["queries"], paths["pool"],
                            str(tmp_path / "lenient.jsonl"), tokenizer=WordTokenizer(),
                            cfg=cot.FilterConfig(require_confidence=False))
  assert lenient.dropped[cot.UNVERIFIED] == 0 and lenient.kept["reason"] == 3


def test_build_cot_command_line(tmp_path):
  paths = _world(tmp_path)
  os.makedirs(os.path.dirname(paths["out"]))
  texts = [GOOD_REASONING, GOOD_ANSWER, QUERY_TEXT, TARGET_TEXT] + [" ".join(t) for t in
                                                                    TRIPS.values()]
  SentencePieceTokenizer.train(texts * 20, str(tmp_path / "sp"), vocab_size=400)
  cmd = [sys.executable, "-m", "trace_jax.tools.build_cot", f"--in={paths['raw']}",
         f"--queries={paths['queries']}", f"--pool={paths['pool']}", f"--out={paths['out']}",
         f"--tokenizer={tmp_path / 'sp.model'}"]
  result = subprocess.run(cmd, cwd=_REPO_ROOT, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == _expected_table(paths["out"])
  _check_outputs(paths)


def test_build_rejects_a_qid_missing_from_the_queries(tmp_path):
  paths = _world(tmp_path)
  with open(paths["raw"], "a", encoding="utf-8") as f:
    f.write(json.dumps({"qid": "5:99", "task_id": 6, "route": "direct",
                        "teacher_output": None}) + "\n")
  message = f"{paths['raw']}:13: qid 5:99 is not in {paths['queries']}"
  with pytest.raises(MBEIRFormatError, match=re.escape(message)):
    build_cot.build(paths["raw"], paths["queries"], paths["pool"], paths["out"])
  assert not os.path.exists(paths["out"])


def test_build_rejects_a_task_id_that_disagrees_with_the_query(tmp_path):
  paths = _world(tmp_path)
  lines = _read_jsonl(paths["raw"])
  lines[0]["task_id"] = 7
  _write_lines(tmp_path / "raw.jsonl", lines)
  with pytest.raises(MBEIRFormatError, match=re.escape(f"{paths['raw']}:1: qid 5:1 has task_id 7")):
    build_cot.build(paths["raw"], paths["queries"], paths["pool"], paths["out"])


def test_dropped_path_and_tokenizer_loading(tmp_path):
  assert build_cot.dropped_path_for("a/cot.jsonl") == "a/cot.dropped.jsonl"
  assert build_cot.dropped_path_for("a/cot") == "a/cot.dropped.jsonl"
  with pytest.raises(ValueError, match="must end in .json or .model"):
    build_cot.load_tokenizer(str(tmp_path / "tok.txt"))
  with pytest.raises(FileNotFoundError, match="tok.json"):
    build_cot.load_tokenizer(str(tmp_path / "tok.json"))


def test_build_instructions_count_as_query_text(tmp_path):
  raw = _write_lines(tmp_path / "raw.jsonl", [
      {"qid": "5:1", "task_id": 6, "route": "reason",
       "teacher_output": _wrap(GOOD_REASONING, "a famous landmark"), "confidence": 0.9}])
  queries = _write_lines(tmp_path / "q.jsonl", [_query("5:1", 6, "What is this?", "5:100")])
  pool = _write_lines(tmp_path / "pool.jsonl", [_candidate("5:100", "Eiffel Tower.")])
  tsv = tmp_path / "query_instructions.tsv"
  tsv.write_text("query_modality\tcand_modality\tdataset\tdataset_id\tprompt_1\tprompt_2\n"
                 "image,text\ttext\tOVEN\t5\tName the landmark.\tWhat is shown?\n")
  out = str(tmp_path / "cot.jsonl")
  assert build_cot.build(raw, queries, pool, out).dropped[cot.KEYWORD] == 1
  report = build_cot.build(raw, queries, pool, out, instructions_path=str(tsv))
  assert report.kept["reason"] == 1 and sum(report.dropped.values()) == 0


def test_training_target_parts():
  record = _reason("5:1", f"<reasoning>{GOOD_REASONING}</reasoning><answer>{GOOD_ANSWER}</answer>")
  assert cot.training_target(record, "answer") == GOOD_ANSWER
  assert cot.training_target(record, "reasoning") == GOOD_REASONING
  assert cot.training_target(record, "full") == f"{GOOD_REASONING} {GOOD_ANSWER}"
  # data.reasoning_marker: the marker ends the reasoning; an answer alone has none.
  assert cot.training_target(record, "full", "</think>") == (
    f"{GOOD_REASONING} </think> {GOOD_ANSWER}")
  assert cot.training_target(record, "reasoning", "</think>") == f"{GOOD_REASONING} </think>"
  assert cot.training_target(record, "answer", "</think>") == GOOD_ANSWER
  with pytest.raises(ValueError, match="target part"):
    cot.training_target(record, "both")


# --------------------------------------------------------------------------------- coverage


def test_training_refuses_a_cot_file_that_misses_a_dataset_unless_told_to_drop_it(
    tmp_path, caplog):
  """mbeir_mini's union train file: four MSCOCO queries and one CIRR query; the CoT file (a
  teacher run over --datasets=cirr) covers CIRR only."""
  from tests.fixtures import MBEIR_MINI
  from trace_jax.data.examples import load_split
  files = [("query/union_train/mbeir_union_up_train.jsonl",
            "cand_pool/global/mbeir_union_train_cand_pool.jsonl")]
  path = _write_lines(tmp_path / "cot.jsonl", [
      {"qid": "8:3", "task_id": 7, "route": "reason", "teacher_output": _wrap("r", "a")}])
  for missing in ("drop", "error"):
    with pytest.raises(ValueError, match=r"no record of any query of MSCOCO \(4 queries\).*"
                                         r'cot_drop_datasets=\("mscoco"\)'):
      load_split(MBEIR_MINI, files, path, cot_missing=missing)
  with caplog.at_level(logging.WARNING):
    kept = load_split(MBEIR_MINI, files, path, cot_missing="drop", cot_drop_datasets=("MSCOCO",))
  assert [e.qid for e in kept] == ["8:3"] and kept[0].reasoning == "r a"
  assert "covers no query of MSCOCO (4 queries): not trained on" in caplog.text
  with pytest.raises(ValueError, match=r"unknown datasets \['coco'\]"):
    load_split(MBEIR_MINI, files, path, cot_drop_datasets=("coco",))
