"""`python -m trace_jax.tools.build_cot`: raw teacher outputs -> filtered M-BEIR-CoT.

    python -m trace_jax.tools.build_cot --in=RAW.jsonl --queries=QUERY.jsonl[,...]
        --pool=POOL.jsonl[,...] --out=OUT.jsonl [--tokenizer=tokenizer.json|sp.model]
        [--instructions=TSV] [--min_confidence=0.7] [--norequire_confidence]

Reads RAW (M-BEIR-CoT lines), joins each record by qid with its query and the text of its positive
candidates, runs `trace_jax.data.cot.filter_record` on reason records (direct records pass
through; the verifier's `confidence` must be above --min_confidence, and a reason record with
none, its verification skipped or never run, is dropped as `unverified` unless
--norequire_confidence),
writes the kept records to OUT and every dropped one (qid, task_id, route, reason) to
`OUT.dropped.jsonl` (a trailing `.jsonl` of OUT is replaced), and prints how many each rule dropped
and how many were kept per route. It does not run a teacher or a verifier model
(`trace_jax.tools.teach` does, and writes the raw file this reads).
"""

from __future__ import annotations

from absl import app, flags

from trace_jax.data import cot
from trace_jax.data.cot_build import build, format_report, load_tokenizer

_IN = flags.DEFINE_string("in", None, "Raw teacher outputs in the M-BEIR-CoT format.")
_QUERIES = flags.DEFINE_list("queries", None, "M-BEIR query JSONL file(s) holding every raw qid.")
_POOL = flags.DEFINE_list("pool", None,
                          "M-BEIR candidate pool file(s) holding the queries' positives.")
_OUT = flags.DEFINE_string("out", None, "Filtered M-BEIR-CoT output (JSONL).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "tokenizer.json or SentencePiece .model for the length rule; "
    "unset: count whitespace-separated words.")
_INSTRUCTIONS = flags.DEFINE_string(
    "instructions", None, "query_instructions.tsv; when set, the prompts of each query's row count "
    "as query text for the keyword rule.")
# Length-rule bounds (inclusive); the defaults are the paper's. Only a toy world should move them.
_MIN_REASONING = flags.DEFINE_integer("min_reasoning_tokens", cot.MIN_REASONING_TOKENS,
                                      "Fewest reasoning tokens kept.")
_MAX_REASONING = flags.DEFINE_integer("max_reasoning_tokens", cot.MAX_REASONING_TOKENS,
                                      "Most reasoning tokens kept.")
_MIN_ANSWER = flags.DEFINE_integer("min_answer_tokens", cot.MIN_ANSWER_TOKENS,
                                   "Fewest answer tokens kept.")
_MAX_ANSWER = flags.DEFINE_integer("max_answer_tokens", cot.MAX_ANSWER_TOKENS,
                                   "Most answer tokens kept.")
_MIN_CONFIDENCE = flags.DEFINE_float("min_confidence", cot.MIN_CONFIDENCE,
                                     "Keep records whose verifier confidence is above this.")
_REQUIRE_CONFIDENCE = flags.DEFINE_bool(
    "require_confidence", True, "Drop reason records with no verifier confidence (`unverified`); "
    "--norequire_confidence only for a raw file no verifier judged.")


def main(argv):
  del argv
  tokenizer = load_tokenizer(_TOKENIZER.value) if _TOKENIZER.value else None
  cfg = cot.FilterConfig(min_reasoning_tokens=_MIN_REASONING.value,
                         max_reasoning_tokens=_MAX_REASONING.value,
                         min_answer_tokens=_MIN_ANSWER.value, max_answer_tokens=_MAX_ANSWER.value,
                         min_confidence=_MIN_CONFIDENCE.value,
                         require_confidence=_REQUIRE_CONFIDENCE.value)
  report = build(_IN.value, _QUERIES.value, _POOL.value, _OUT.value, tokenizer=tokenizer,
                 instructions_path=_INSTRUCTIONS.value, cfg=cfg)
  print(format_report(report))


if __name__ == "__main__":
  flags.mark_flags_as_required(["in", "queries", "pool", "out"])
  app.run(main)
