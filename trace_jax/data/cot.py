"""The M-BEIR-CoT file format, the teacher-output parser and the paper's quality filters.

What this is: a strict reader for M-BEIR-CoT JSON lines (one line per query id: `qid`, `task_id`,
`route`, `teacher_output`, and the verifier's optional `confidence`), the parser that splits a
teacher output `<reasoning>...</reasoning><answer>...</answer>` into its two blocks, the
training target with the
tags stripped, and the filters of TRACE §M-BEIR-CoT (structure, length, repetition, refusal,
non-English, keyword overlap, the verifier's confidence above 0.7, and a verifier confidence
present at all), each a small function returning a reason code or None. The format and every
threshold are documented in `docs/data.md`.

What this is not: no teacher model and no verifier model (`trace_jax/teach/` runs them and writes
`confidence`), no prompt building (`prompts.py`) and no file joining or writing
(`trace_jax.tools.build_cot`). Token counts use whatever `Tokenizer` the caller passes.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
from typing import Callable, Iterator, Literal

from trace_jax.data.mbeir import DATASET_IDS, MBEIRFormatError, read_jsonl
from trace_jax.data.tokenizer import Tokenizer

_log = logging.getLogger(__name__)
ROUTES = ("reason", "direct")
Route = Literal["reason", "direct"]

# Reason codes, in the order `filter_record` applies the rules.
STRUCTURE, LENGTH, REPETITION, REFUSAL, NON_ENGLISH, KEYWORD, CONFIDENCE, UNVERIFIED = (
    "structure", "length", "repetition", "refusal", "non_english", "keyword", "confidence",
    "unverified")
RULES = (STRUCTURE, LENGTH, REPETITION, REFUSAL, NON_ENGLISH, KEYWORD, CONFIDENCE, UNVERIFIED)

# Verifier rule (TRACE §M-BEIR-CoT): keep a sample whose verifier confidence (probability of
# "yes") is above this. A record without a confidence (its verification was skipped or never
# ran) fails as `unverified` while the rule is on (`FilterConfig.require_confidence`).
MIN_CONFIDENCE = 0.7

# Length rule (TRACE §M-BEIR-CoT), inclusive bounds in tokens of the given tokenizer.
MIN_REASONING_TOKENS, MAX_REASONING_TOKENS = 16, 256
MIN_ANSWER_TOKENS, MAX_ANSWER_TOKENS = 2, 64
# The longest target the length rule admits, in tokens: reasoning and answer, plus room for the
# space that joins them (re-tokenised joins can differ by a token or two), an end-of-reasoning
# marker and `<|emb|>`. `loss.max_target_tokens` and `eval.max_new_tokens` default to it.
MAX_TARGET_TOKENS = MAX_REASONING_TOKENS + MAX_ANSWER_TOKENS + 16

# Repetition rule: over the lowercased words of "reasoning answer", the fraction of word 4-grams
# that repeat an earlier 4-gram (1 - distinct / total) must not exceed 0.5; and no sentence of the
# reasoning with at least 3 words may occur twice (after lowercasing and dropping punctuation).
REPEAT_NGRAM = 4
MAX_REPEATED_NGRAM_FRACTION = 0.5
MIN_REPEAT_SENTENCE_WORDS = 3

# Non-English rule: among the alphabetic characters (`str.isalpha`) of reasoning and answer, the
# fraction that are ASCII letters a-z / A-Z must be at least 0.9 (leaves room for "Zürich").
MIN_ASCII_LETTER_FRACTION = 0.9

# Refusal / boilerplate rule: any of these phrases, matched case-insensitively on word boundaries
# anywhere in reasoning or answer (curly apostrophes count as straight ones).
REFUSAL_PHRASES = (
    "i cannot", "i can't", "i can not", "i'm sorry", "i am sorry", "i apologize", "as an ai",
    "as a language model", "i am unable", "i'm unable", "unable to determine", "cannot determine",
    "can't determine", "not possible to determine", "impossible to determine", "i don't know",
    "i do not know", "no image provided", "no image was provided", "hope this helps",
    "let me know if", "sure, here", "here is the answer",
)

# Keyword rule: a keyword is a lowercased run of letters/digits of length >= 3 not in this list,
# which holds English function words and words every retrieval instruction uses.
MIN_KEYWORD_CHARS = 3
STOPWORDS = frozenset("""
about above after again against all also and any are because been before being below between both
but can could did does doing down during each few for from further had has have having her here
hers him his how into its itself just more most not now off once only other our out over own same
she should some such than that the their them then there these they this those through too under
until very was were what when where which while who whom why will with would you your yours
image images picture pictures photo photos photograph retrieve find identify show shows showing
match matches matching description caption query similar based given following provide
""".split())

_TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")
_BLOCKS_RE = re.compile(r"\s*<reasoning>(.*)</reasoning>\s*<answer>(.*)</answer>\s*", re.DOTALL)
_QID_RE = re.compile(r"\d+:\d+")
_WORD_RE = re.compile(r"\w+")
_KEYWORD_RE = re.compile(r"[a-z0-9]+")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+|\n+")
_REFUSAL_RE = re.compile(r"\b(?:" + "|".join(re.escape(p) for p in REFUSAL_PHRASES) + r")(?!\w)")


class CoTFilterError(ValueError):
  """A teacher output fails a filter; `reason` is one of `RULES`."""

  def __init__(self, reason: str, message: str):
    super().__init__(f"{reason}: {message}")
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class CoTRecord:
  """One M-BEIR-CoT line."""
  qid: str  # "ds:n", in the query namespace of M-BEIR.
  task_id: int  # UniIR task id of the query.
  route: Route  # "reason": train on the teacher text; "direct": `<|emb|>` only.
  teacher_output: str | None  # `<reasoning>...</reasoning><answer>...</answer>`; None if direct.
  confidence: float | None = None  # The verifier's probability of "yes"; None: not verified.

  def to_json(self) -> dict[str, object]:
    """The record as the JSON object of one M-BEIR-CoT line (`confidence` only when set)."""
    out = dataclasses.asdict(self)
    if self.confidence is None:
      del out["confidence"]
    return out


@dataclasses.dataclass(frozen=True)
class FilterConfig:
  """Thresholds of the filters; the defaults are the module constants (the paper's values)."""
  min_reasoning_tokens: int = MIN_REASONING_TOKENS
  max_reasoning_tokens: int = MAX_REASONING_TOKENS
  min_answer_tokens: int = MIN_ANSWER_TOKENS
  max_answer_tokens: int = MAX_ANSWER_TOKENS
  repeat_ngram: int = REPEAT_NGRAM
  max_repeated_ngram_fraction: float = MAX_REPEATED_NGRAM_FRACTION
  min_repeat_sentence_words: int = MIN_REPEAT_SENTENCE_WORDS
  min_ascii_letter_fraction: float = MIN_ASCII_LETTER_FRACTION
  min_confidence: float = MIN_CONFIDENCE
  # The verifier rule is on: a reason record without a confidence fails (`unverified`). Off only
  # for a raw file no verifier judged at all (`build_cot --norequire_confidence`).
  require_confidence: bool = True


@dataclasses.dataclass(frozen=True)
class Sample:
  """What the content filters (every rule after `structure`) look at."""
  reasoning: str  # Reasoning block, stripped.
  answer: str  # Answer block, stripped.
  reasoning_tokens: int  # Token count of `reasoning`.
  answer_tokens: int  # Token count of `answer`.
  query_text: str  # Query instruction and text; "" when there is none.
  target_text: str  # Text of the positive candidate(s); "" for image-only targets.


# ------------------------------------------------------------------------------------ reading


def _check_record(raw: dict[str, object], where: str) -> CoTRecord:
  """Validates one decoded line; every error starts with `where` (`path:line`)."""
  for key in ("qid", "task_id", "route", "teacher_output"):
    if key not in raw:
      raise MBEIRFormatError(f"{where}: missing required key {key!r}")
  qid, task_id, route, output = raw["qid"], raw["task_id"], raw["route"], raw["teacher_output"]
  if not isinstance(qid, str) or not _QID_RE.fullmatch(qid):
    raise MBEIRFormatError(f"{where}: key 'qid' must be a string 'dataset_id:n', got {qid!r}")
  if not isinstance(task_id, int) or isinstance(task_id, bool):
    raise MBEIRFormatError(f"{where}: key 'task_id' must be int, got {task_id!r}")
  if route not in ROUTES:
    raise MBEIRFormatError(f"{where}: key 'route' must be one of {ROUTES}, got {route!r}")
  if route == "reason" and not isinstance(output, str):
    raise MBEIRFormatError(f"{where}: qid {qid} has route 'reason' but teacher_output is "
                           f"{output!r}, not a string")
  if route == "direct" and output is not None:
    raise MBEIRFormatError(f"{where}: qid {qid} has route 'direct' but a non-null teacher_output")
  confidence = raw.get("confidence")
  if confidence is not None and (isinstance(confidence, bool) or not isinstance(
      confidence, (int, float)) or not 0.0 <= confidence <= 1.0):
    raise MBEIRFormatError(f"{where}: key 'confidence' must be a number in [0, 1] or null, got "
                           f"{confidence!r}")
  return CoTRecord(qid=qid, task_id=task_id, route=route, teacher_output=output,
                   confidence=None if confidence is None else float(confidence))


def iter_cot(path: str) -> Iterator[tuple[int, CoTRecord]]:
  """Yields `(line_number, record)` for each line of an M-BEIR-CoT file (1-based).

  Duplicates are not checked here; `read_cot_numbered` does.

  Raises:
    MBEIRFormatError: bad JSON, a missing or mistyped key, an unknown route, a reason record
      without a teacher output or a direct one with a non-null output (names file and line).
  """
  for n, raw in read_jsonl(path):
    yield n, _check_record(raw, f"{path}:{n}")


def read_cot_numbered(path: str) -> dict[str, tuple[int, CoTRecord]]:
  """Reads an M-BEIR-CoT file into `{qid: (line_number, record)}`, in file order.

  Raises:
    MBEIRFormatError: as `iter_cot`, or a qid seen before (names file, both lines and the qid).
  """
  out: dict[str, tuple[int, CoTRecord]] = {}
  for n, record in iter_cot(path):
    if record.qid in out:
      raise MBEIRFormatError(f"{path}:{n}: duplicate qid {record.qid!r} "
                             f"(first on line {out[record.qid][0]})")
    out[record.qid] = (n, record)
  return out


def read_cot(path: str) -> dict[str, CoTRecord]:
  """Reads an M-BEIR-CoT file into `{qid: record}`, in file order; errors as `read_cot_numbered`."""
  return {qid: record for qid, (_, record) in read_cot_numbered(path).items()}


# ------------------------------------------------------------------------------ parse and strip


def parse_teacher_output(text: str) -> tuple[str, str]:
  """Splits `<reasoning>R</reasoning><answer>A</answer>` into `(R, A)`, both stripped.

  Whitespace may surround the blocks; any other text outside them, a tag that occurs other than
  exactly once, or the answer before the reasoning fails. Tags are case-sensitive.

  Raises:
    CoTFilterError: with reason `structure`, naming what is wrong.
  """
  for tag in _TAGS:
    count = text.count(tag)
    if count != 1:
      raise CoTFilterError(STRUCTURE, f"expected exactly one {tag}, found {count}")
  match = _BLOCKS_RE.fullmatch(text)
  if match is None:
    raise CoTFilterError(STRUCTURE, "expected <reasoning>...</reasoning> then <answer>...</answer> "
                         "and nothing else")
  return match.group(1).strip(), match.group(2).strip()


def join_target(reasoning: str, answer: str, marker: str = "") -> str:
  """The training text of a parsed output: reasoning, one space, answer; with `marker` (the
  end-of-reasoning token, `data.reasoning_marker`), `"{reasoning} {marker} {answer}"`."""
  return f"{reasoning} {marker} {answer}" if marker else f"{reasoning} {answer}"


TARGET_PARTS = ("full", "answer", "reasoning")  # The paper's training-data ablation.


def training_target(record: CoTRecord, part: str = "full", marker: str = "") -> str | None:
  """The text the model learns before `<|emb|>`: the tags stripped, reasoning then answer.

  Args:
    part: "full" (reasoning then answer), "answer" or "reasoning" alone (`data.target`).
    marker: an end-of-reasoning token written right after the reasoning ("" = none): between
      reasoning and answer for "full", after the reasoning for "reasoning"; "answer" has no
      reasoning to end, so no marker.
  Returns:
    `"{reasoning} {answer}"` (each block stripped, joined by a single space) for a reason record,
    or the one part asked for; None for a direct record (its target is `<|emb|>` alone).

  Raises:
    CoTFilterError: a reason record whose output fails the structure rule.
  """
  if part not in TARGET_PARTS:
    raise ValueError(f"target part {part!r}; expected one of {TARGET_PARTS}")
  if record.route == "direct":
    return None
  reasoning, answer = parse_teacher_output(record.teacher_output)
  if part == "answer":
    return answer
  if part == "reasoning":
    return f"{reasoning} {marker}" if marker else reasoning
  return join_target(reasoning, answer, marker)


# ------------------------------------------------------------------------------------ filters


def check_structure(text: str) -> str | None:
  """Rule 1: exactly one reasoning block and one answer block, in that order."""
  try:
    parse_teacher_output(text)
  except CoTFilterError:
    return STRUCTURE
  return None


def check_length(sample: Sample, cfg: FilterConfig = FilterConfig()) -> str | None:
  """Rule 2: reasoning and answer token counts within their inclusive bounds."""
  ok = (cfg.min_reasoning_tokens <= sample.reasoning_tokens <= cfg.max_reasoning_tokens and
        cfg.min_answer_tokens <= sample.answer_tokens <= cfg.max_answer_tokens)
  return None if ok else LENGTH


def _words(text: str) -> list[str]:
  return _WORD_RE.findall(text.lower())


def repeated_ngram_fraction(words: list[str], n: int) -> float:
  """`1 - distinct / total` over the word n-grams of `words`; 0.0 when there are none."""
  grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
  return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _has_repeated_sentence(text: str, min_words: int) -> bool:
  seen = set()
  for sentence in _SENTENCE_END_RE.split(text):
    words = tuple(_words(sentence))
    if len(words) < min_words:
      continue
    if words in seen:
      return True
    seen.add(words)
  return False


def check_repetition(sample: Sample, cfg: FilterConfig = FilterConfig()) -> str | None:
  """Rule 3: too many repeated word n-grams, or a reasoning sentence said twice."""
  words = _words(join_target(sample.reasoning, sample.answer))
  if repeated_ngram_fraction(words, cfg.repeat_ngram) > cfg.max_repeated_ngram_fraction:
    return REPETITION
  if _has_repeated_sentence(sample.reasoning, cfg.min_repeat_sentence_words):
    return REPETITION
  return None


def check_refusal(sample: Sample, cfg: FilterConfig = FilterConfig()) -> str | None:
  """Rule 4: a phrase of `REFUSAL_PHRASES` anywhere in reasoning or answer."""
  del cfg  # The phrase list is fixed.
  text = join_target(sample.reasoning, sample.answer).lower().replace("\u2019", "'")
  return REFUSAL if _REFUSAL_RE.search(text) else None


def ascii_letter_fraction(text: str) -> float:
  """Fraction of the alphabetic characters of `text` that are ASCII; 0.0 when there are none."""
  letters = [c for c in text if c.isalpha()]
  if not letters:
    return 0.0
  return sum(c.isascii() for c in letters) / len(letters)


def check_non_english(sample: Sample, cfg: FilterConfig = FilterConfig()) -> str | None:
  """Rule 5: too few ASCII letters among the letters of reasoning and answer."""
  fraction = ascii_letter_fraction(join_target(sample.reasoning, sample.answer))
  return NON_ENGLISH if fraction < cfg.min_ascii_letter_fraction else None


def keywords(text: str) -> set[str]:
  """Salient words of `text`: lowercased `[a-z0-9]+` runs, >= 3 chars, not in `STOPWORDS`."""
  return {w for w in _KEYWORD_RE.findall(text.lower())
          if len(w) >= MIN_KEYWORD_CHARS and w not in STOPWORDS}


def check_keyword(sample: Sample, cfg: FilterConfig = FilterConfig()) -> str | None:
  """Rule 6: the answer shares a keyword with the query text or the target's text."""
  del cfg  # The keyword definition is fixed.
  context = keywords(sample.query_text) | keywords(sample.target_text)
  return None if keywords(sample.answer) & context else KEYWORD


# The rules after `structure`, in the order they are applied.
CONTENT_FILTERS: tuple[Callable[[Sample, FilterConfig], str | None], ...] = (
    check_length, check_repetition, check_refusal, check_non_english, check_keyword)


def make_sample(reasoning: str, answer: str, query_text: str | None, target_text: str | None,
                tokenizer: Tokenizer | None) -> Sample:
  """Builds a `Sample`, counting tokens with `tokenizer` (None: whitespace-separated words)."""
  def count(text: str) -> int:
    return len(tokenizer.encode(text)) if tokenizer is not None else len(text.split())

  return Sample(reasoning=reasoning, answer=answer, reasoning_tokens=count(reasoning),
                answer_tokens=count(answer), query_text=query_text or "",
                target_text=target_text or "")


def filter_record(record: CoTRecord, query_text: str | None, target_text: str | None,
                  tokenizer: Tokenizer | None, cfg: FilterConfig = FilterConfig()) -> str | None:
  """Applies the rules in `RULES` order and returns the first one the record fails.

  Args:
    record: an M-BEIR-CoT record; a direct record always passes.
    query_text: the query's instruction and text (None or "" for an image-only query).
    target_text: the text of the query's positive candidate(s) (None or "" if image-only).
    tokenizer: counts the length rule's tokens; None counts whitespace-separated words.
    cfg: thresholds; the defaults are the paper's.

  Returns:
    A reason code from `RULES`, or None when the record is kept.
  """
  if record.route == "direct":
    return None
  try:
    reasoning, answer = parse_teacher_output(record.teacher_output)
  except CoTFilterError as e:
    return e.reason
  sample = make_sample(reasoning, answer, query_text, target_text, tokenizer)
  for check in CONTENT_FILTERS:
    reason = check(sample, cfg)
    if reason is not None:
      return reason
  return check_confidence(record, cfg)


def check_confidence(record: CoTRecord, cfg: FilterConfig = FilterConfig()) -> str | None:
  """Rule 7: the verifier's confidence must be above `min_confidence`; a record no verifier
  judged fails as `unverified` (rule 8) unless `require_confidence` is off."""
  if record.confidence is None:
    return UNVERIFIED if cfg.require_confidence else None
  return None if record.confidence > cfg.min_confidence else CONFIDENCE


# ----------------------------------------------------------------------------------- coverage


class CoTCoverage:
  """Which datasets a CoT file covers (it holds a record of at least one of their queries), and
  the training queries of the others: dropped when `drop` names their dataset, else counted as
  uncovered for `check` to refuse. A teacher run over `--datasets=cirr` covers only CIRR; a
  training run reading it with `cot_missing=drop` would otherwise lose every other dataset's
  reasoning queries without a word."""

  def __init__(self, records: dict[str, CoTRecord], drop: tuple[str, ...] = ()):
    names = {name.lower(): i for name, i in DATASET_IDS.items()}
    unknown = [d for d in drop if d.lower() not in names]
    if unknown:
      raise ValueError(f"data.cot_drop_datasets names unknown datasets {unknown}; expected "
                       f"names of {sorted(DATASET_IDS)}")
    self.covered = {int(q.partition(":")[0]) for q in records if q.partition(":")[0].isdigit()}
    self.drop = {names[d.lower()] for d in drop}
    self.dropped: collections.Counter = collections.Counter()  # dataset id -> queries
    self.uncovered: collections.Counter = collections.Counter()

  def admits(self, dataset_id: int) -> bool:
    """Whether a query of this dataset is looked up in the file (else counted, not trained)."""
    if dataset_id in self.covered:
      return True
    (self.dropped if dataset_id in self.drop else self.uncovered)[dataset_id] += 1
    return False

  def check(self, cot_file: str) -> None:
    """Logs the dropped datasets; raises naming the uncovered ones and their query counts."""
    names = {i: name for name, i in DATASET_IDS.items()}
    describe = lambda c: ", ".join(  # noqa: E731
      f"{names.get(i, i)} ({n} queries)" for i, n in sorted(c.items()))
    if self.dropped:
      _log.warning("%s covers no query of %s: not trained on (data.cot_drop_datasets)",
                   cot_file, describe(self.dropped))
    if self.uncovered:
      raise ValueError(
        f"{cot_file} (data.cot_file) has no record of any query of {describe(self.uncovered)} "
        "in data.train_files: build it over them, or name them in data.cot_drop_datasets "
        "(e.g. data.cot_drop_datasets=(" + ", ".join(
          f'"{names.get(i, i).lower()}"' for i in sorted(self.uncovered)) + ")) to train "
        "without them")
