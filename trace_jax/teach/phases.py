"""The teacher's three phases and the merge into the raw M-BEIR-CoT file (TRACE.md, "Building
M-BEIR-CoT").

- `assess`: a route per query, `reason` or `direct`: by dataset (and task) as the paper did in
  practice (`assess.reason`), or by asking the teacher whether the query needs reasoning
  (`assess.mode=teacher`: its probability of "yes" above `assess.threshold`).
- `generate`: the reason queries through the generation engine with their sub-task's template,
  the template's head prefilled once per sub-task; the output is kept up to `</answer>`.
- `verify`: the verifier (the same engine's prefill; the teacher itself unless another model is
  given) reads each output with its sub-task's verifier template and the positive (its image or
  text) and writes its probability of "yes" as `confidence`.
- retries (`attempts.py`): an output the verifier rejects (confidence <= `min_confidence`, the
  threshold build_cot applies) or that fails build_cot's structure rule is generated again, with
  a fresh seed (attempt k: `seed_of(qid, seed + k)`), up to `max_attempts`; `--phase=all` runs
  generate-then-verify once per attempt, and a single `--phase=generate` makes the attempts the
  verified records call for. Each attempt is its own record (`attempt`) in the shards. Greedy
  decoding makes one attempt.
- `merge`: every query with its route, teacher output and confidence, in query-file order (a
  retried query: its first accepted attempt, else its last): the raw file `tools/build_cot`
  filters; the report counts the retries (`retried`, an `attempts` histogram) and the prompt
  budget's cuts per phase.

The prompt budget: a teacher or verifier prompt longer than the largest bucket has its {target}
text (the positive's: a knowledge entity's whole Wikipedia text), then its {query} text, cut to
fit (`_fit_ids`, `prompting.fit_fields`); head, image tokens, instruction, the answer being
verified and the template's fixed text stay whole. Each cut is logged with its qid and recorded
(`cut`) in the phase's record. A prompt that does not fit even with those fields empty is a bad
example.

Each process takes a strided share of the queries and writes its own shards (`shards.py`), so a
killed run resumes where it stopped and several processes split the work without talking; a
missing image or a prompt too long for the buckets even when cut stops the run naming the query,
or under `data.on_bad_example=skip` is written to the `skipped` shards with its reason and
counted.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os
import sys
import time
import zlib
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trace_jax.data import cot
from trace_jax.data import image as image_lib
from trace_jax.data.prompts import PromptTooLongError
from trace_jax.generate import Engine, Request, Sampling, batching
from trace_jax.generate.programs import prefill
from trace_jax.teach import attempts, shards
from trace_jax.teach.items import TeachItem
from trace_jax.teach.prompting import (CUTTABLE, Template, chat_ids, first_token_ids,
                                       fit_fields, teacher_output, trace_ids)

RAW_FILE = "mbeir_cot_raw.jsonl"
REPORT_FILE = "teach_report.json"
_log = logging.getLogger(__name__)


@dataclasses.dataclass
class Teacher:
  """A loaded teacher: model, tokenizer, the mesh of this process's devices, the image grid its
  images are resized to, the M-BEIR root they are read under, and how it is prompted (`tagged`
  chat templates, or `trace`: a TRACE model's own query prompt, `compact` as it was trained)."""

  model: Any
  tok: Any
  mesh: Any
  grid: tuple[int, int, int]
  root: str
  output_format: str = "tagged"
  compact: bool = False

  @property
  def image_tokens(self) -> int:
    return int(np.prod(self.grid)) // self.model.cfg.vision.spatial_merge_size**2

  @functools.cached_property
  def split(self):
    """The model split once (`nnx.split`) for the jitted prefill."""
    return nnx.split(self.model)


class BadItem(ValueError):
  """A query the teacher cannot be given (its image is missing, its prompt too long)."""


class Progress:
  """A progress line every `every` seconds: done/total, queries/s, tokens/s, skipped."""

  def __init__(self, phase: str, total: int, every: float):
    self.phase, self.total, self.every = phase, total, every
    self.start = self.last = time.perf_counter()
    self.done = self.tokens = self.skipped = 0

  def add(self, done: int = 0, tokens: int = 0, skipped: int = 0, force: bool = False) -> None:
    self.done, self.tokens, self.skipped = (self.done + done, self.tokens + tokens,
                                            self.skipped + skipped)
    now = time.perf_counter()
    if force or now - self.last >= self.every:
      self.last, elapsed = now, max(now - self.start, 1e-9)
      print(f"[{self.phase}] process {jax.process_index()}: {self.done}/{self.total} queries, "
            f"{self.done / elapsed:.2f} queries/s, {self.tokens / elapsed:.1f} tokens/s, "
            f"{self.skipped} skipped", flush=True)


def my_share(items: list[TeachItem], done: set,
             key: Callable[[TeachItem], Any] = lambda it: it.qid) -> list[TeachItem]:
  """The items of this process's strided share (by position in `items`, the same in every
  process whatever each has seen written) whose `key` is not yet done."""
  p, n = jax.process_index(), jax.process_count()
  return [it for i, it in enumerate(items) if i % n == p and key(it) not in done]


def seed_of(qid: str, seed: int) -> int:
  """A query's own sampling seed: its output does not depend on where it ran."""
  return (seed + zlib.crc32(qid.encode())) & 0x7FFFFFFF


# --------------------------------------------------------------------------------------- assess


def assess(config, teacher: Teacher | None, items: list[TeachItem], out_dir: str) -> None:
  """Writes a route for each query of this process's share."""
  shard = shards.Shard(out_dir, "routes")
  mine = my_share(items, shard.done)
  progress = Progress("assess", len(mine), config.progress_seconds)
  if config.assess.mode == "dataset":
    reason = set(config.assess.reason)
    shard.write({"qid": it.qid, "task_id": it.task_id,
                 "route": "reason" if {it.dataset, it.task_key} & reason else "direct"}
                for it in mine)
    progress.add(len(mine), force=True)
  elif config.assess.mode == "teacher":
    template, cuts = Template(**config.assess.template), {}
    for batch, confidence in _yes_probabilities(config, teacher, mine, template, progress,
                                                cuts=cuts):
      shard.write(_with_cut({"qid": it.qid, "task_id": it.task_id, "p_reason": round(float(p), 6),
                             "route": "reason" if p > config.assess.threshold else "direct"},
                            cuts) for it, p in zip(batch, confidence))
    _note_cuts("assess", cuts)
  else:
    raise ValueError(f"assess.mode={config.assess.mode!r}; expected 'dataset' or 'teacher'")
  shard.close()


def routes(out_dir: str, items: list[TeachItem]) -> dict[str, str]:
  """Every query's route; raises when some query has none (run the assess phase first)."""
  got = {r["qid"]: sys.intern(r["route"]) for r in shards.read(out_dir, "routes")}
  missing = [it.qid for it in items if it.qid not in got]
  if missing:
    raise FileNotFoundError(f"{len(missing)} queries have no route in {out_dir} (e.g. "
                            f"{missing[:3]}): run --phase=assess first")
  return got


# ------------------------------------------------------------------------------------- generate


def generate(config, teacher: Teacher, items: list[TeachItem], out_dir: str) -> None:
  """Writes a teacher output for each reason query of this process's share that needs one: its
  first attempt, or the next after a rejected one (`attempts.next_attempts`)."""
  route = routes(out_dir, items)
  shard = shards.Shard(out_dir, "generated", key=shards.attempt_key)
  skipped = shards.Shard(out_dir, "skipped")
  attempt = attempts.next_attempts(config, out_dir,
                                   [it for it in items if route[it.qid] == "reason"])
  todo = [it for it in items if it.qid in attempt]
  mine = [it for it in my_share(todo, shard.done, key=lambda it: (it.qid, attempt[it.qid]))
          if it.qid not in skipped.done]
  g = config.generate
  progress = Progress("generate", len(mine), config.progress_seconds)
  stops, stop_strings = _stops(teacher, g)
  by_template, cuts = collections.defaultdict(list), {}
  for it in mine:
    by_template[_template_name(config.templates_for, it)].append(it)
  for name, group in by_template.items():
    template = Template(**config.templates[name])
    prefix = _shared_prefix(teacher, template)
    requests = _requests(config, teacher, template, group, skipped, progress, cuts, attempt)
    engine = Engine(teacher.model, capacity=g.slots, max_new_tokens=g.max_new_tokens,
                    cache_len=len(prefix) + max(g.prompt_buckets) + g.max_new_tokens,
                    stop_ids=stops, sampling=Sampling(g.temperature, g.top_k, g.top_p),
                    chunk=g.chunk, mesh=teacher.mesh,
                    one_device_rows=max(1, g.batch_size // teacher.mesh.size))
    for f in engine.run(requests, grid=teacher.grid, buckets=g.prompt_buckets,
                        batch_size=g.batch_size, stop_strings=stop_strings,
                        decode=teacher.tok.decode, prefix=prefix,
                        prefetch=g.prefetch_batches * g.batch_size, workers=g.decode_workers,
                        on_error=lambda r, e: _skip(config, skipped, r.tag, e, progress)):
      it = f.tag
      text = teacher.tok.decode([t for t in f.tokens if t not in stops])
      shard.write([_with_cut({"qid": it.qid, "task_id": it.task_id, "route": "reason",
                              "attempt": attempt[it.qid],
                              "teacher_output": teacher_output(text, teacher.output_format),
                              "new_tokens": len(f.tokens), "capped": f.capped}, cuts)])
      progress.add(1, len(f.tokens))
  progress.add(force=True)
  _note_cuts("generate", cuts)
  shard.close()
  skipped.close()


def _note_cuts(phase: str, cuts: dict[str, dict]) -> None:
  """One warning per phase for the prompts the budget cut (each was logged at info level)."""
  if cuts:
    _log.warning("[%s] process %d: %d prompts cut to fit the largest bucket (e.g. %s; every "
                 "qid in the report's prompt_cuts)", phase, jax.process_index(), len(cuts),
                 sorted(cuts)[:5])


def _with_cut(record: dict, cuts: dict[str, dict]) -> dict:
  """The record with its prompt's cut (`cut`: field -> tokens), when the budget cut it."""
  if record["qid"] in cuts:
    record["cut"] = cuts[record["qid"]]
  return record


def _stops(teacher: Teacher, g) -> tuple[tuple[int, ...], tuple[str, ...]]:
  """Stop ids and strings: a TRACE teacher stops at `<|emb|>`; a chat teacher at the end of its
  turn and at `</answer>`."""
  if teacher.output_format == "trace":
    return (teacher.tok.emb_id,), ()
  ids = []
  for token in ("<|im_end|>", "<|endoftext|>"):
    try:
      ids.append(teacher.tok.token_to_id(token))
    except KeyError:
      pass
  return tuple(ids), tuple(g.stop_strings)


def _template_name(templates_for, it: TeachItem) -> str:
  """The template of a query: by `DATASET:task`, then by task id, then "default"."""
  for key in (it.task_key, str(it.task_id), "default"):
    if key in templates_for:
      return templates_for[key]
  raise KeyError(f"{it.where}: no template for {it.task_key} (config templates_for)")


def _shared_prefix(teacher: Teacher, template: Template) -> list[int]:
  """The ids every prompt of a template starts with (its system turn and head), prefilled once;
  none for a TRACE teacher."""
  if teacher.output_format != "tagged":
    return []
  ids, shared = chat_ids(teacher.tok, template.head, 0, "")
  return ids[:shared]


def _requests(config, teacher: Teacher, template: Template, group: list[TeachItem],
              skipped: shards.Shard, progress: Progress, cuts: dict[str, dict],
              attempt: dict[str, int]) -> Iterator[Request]:
  """Engine requests of the group, built as the engine reads them, each seeded for its query's
  attempt: a prompt that does not fit even after the prompt budget's cuts (recorded in `cuts`) is
  skipped or raised here; an image is decoded by the engine's workers when the request is about
  to be admitted (`_pixels`: a missing or unreadable one reaches `_skip` then)."""
  for it in group:
    try:
      ids, _, image = _prompt(teacher, template, it, config.generate.prompt_buckets, answer="",
                              cuts=cuts)
    except BadItem as e:
      _skip(config, skipped, it, e, progress)
      continue
    pixels = None if image is None else functools.partial(_pixels, teacher, image)
    yield Request(ids, pixels, seed_of(it.qid, config.seed + attempt[it.qid]), it)


def _pixels(teacher: Teacher, image: str) -> np.ndarray:
  """The [P, C] pixels of an image (relative to the root) at the teacher's grid; BadItem when it
  is missing or unreadable."""
  path = os.path.join(teacher.root, image)
  if not os.path.isfile(path):
    raise BadItem(f"image not found: {path}")
  try:
    return image_lib.resize_to_grid(path, teacher.grid[1:])[0]
  except ValueError as e:
    raise BadItem(str(e)) from e


def _prompt(teacher: Teacher, template: Template, it: TeachItem, buckets, answer: str,
            prefixed: bool = True, cuts: dict[str, dict] | None = None):
  """(prompt ids, shared prefix length, the image's path under the root or None) of a query
  (the image is not read here: `_pixels`); BadItem when the prompt (after the shared prefix when
  `prefixed`) does not fit the largest bucket even with its cuttable fields emptied (`_fit_ids`;
  cuts go to `cuts[qid]`)."""
  image = template.image_of(it) if teacher.output_format == "tagged" else it.query_image
  n_img = teacher.image_tokens if image is not None else 0
  ids, shared = _fit_ids(teacher, template, it, n_img, answer, max(buckets), prefixed, cuts)
  return ids, shared, image


def _fit_ids(teacher: Teacher, template: Template, it: TeachItem, n_img: int, answer: str,
             budget: int, prefixed: bool, cuts: dict[str, dict] | None):
  """(ids, shared prefix length) of a query's prompt within `budget` tokens (past the shared
  prefix when `prefixed`): the prompt budget. Its {target} text, then its {query} text, are cut
  as far as needed (`prompting.fit_fields`), the cut logged and recorded in `cuts[qid]`;
  BadItem when even empty fields leave it too long."""

  it = it.resolved()  # Its positive's text, read once for the prompt's several builds.

  def build(item):
    if teacher.output_format == "trace":
      return trace_ids(teacher.tok, item, n_img, teacher.compact), 0
    return chat_ids(teacher.tok, template.head, n_img, template.fill(item, answer))

  def length_of(item):
    ids, shared = build(item)
    return len(ids) - (shared if prefixed else 0)

  ids, shared = build(it)
  if len(ids) - (shared if prefixed else 0) <= budget:
    return ids, shared
  fields = (("query",) if teacher.output_format == "trace" else
            tuple(name for name, _ in CUTTABLE if "{" + name + "}" in template.body))
  fitted, cut = fit_fields(teacher.tok, it, length_of, budget, fields)
  ids, shared = build(fitted)
  length = len(ids) - (shared if prefixed else 0)
  if length > budget:
    raise BadItem(str(PromptTooLongError(
      f"a prompt of {length} tokens (past any shared prefix) is longer than the largest bucket "
      f"{budget} even with its {' and '.join(fields) or 'no'} text cut to nothing")))
  _log.info("%s (query %s): cut %s tokens to fit the largest prompt bucket %d", it.where, it.qid,
            cut, budget)
  if cuts is not None:
    cuts[it.qid] = cut
  return ids, shared


def _skip(config, skipped: shards.Shard, it: TeachItem, error: Exception,
          progress: Progress) -> None:
  reason = f"{it.where} (query {it.qid}): {error}"
  if config.data.on_bad_example != "skip":
    raise BadItem(reason) from error
  _log.warning("skipped %s", reason)
  skipped.write([{"qid": it.qid, "task_id": it.task_id, "reason": reason}])
  progress.add(skipped=1)


# --------------------------------------------------------------------------------------- verify


def verify(config, verifier: Teacher, items: list[TeachItem], out_dir: str) -> None:
  """Writes the verifier's confidence for the latest attempt of each generated output of this
  process's share."""
  latest = {qid: tried[max(tried)] for qid, tried in attempts.by_attempt(
    shards.read(out_dir, "generated"), ("qid", "attempt", "teacher_output")).items()}
  shard = shards.Shard(out_dir, "verified", key=shards.attempt_key)
  skipped = shards.Shard(out_dir, "skipped")
  todo = [it for it in items if it.qid in latest]
  mine = [it for it in my_share(todo, shard.done,
                                key=lambda it: shards.attempt_key(latest[it.qid]))
          if it.qid not in skipped.done]
  progress = Progress("verify", len(mine), config.progress_seconds)
  by_template, cuts = collections.defaultdict(list), {}
  for it in mine:
    by_template[_template_name(config.verify.templates_for, it)].append(it)
  for name, group in by_template.items():
    template = Template(**config.verify.templates[name])
    answer = lambda it: _answer_of(latest[it.qid]["teacher_output"])  # noqa: E731
    for batch, p in _yes_probabilities(config, verifier, group, template, progress, answer,
                                       skipped, cuts):
      shard.write(_with_cut({"qid": it.qid, "attempt": shards.attempt_key(latest[it.qid])[1],
                             "confidence": round(float(x), 6)}, cuts)
                  for it, x in zip(batch, p))
  progress.add(force=True)
  _note_cuts("verify", cuts)
  shard.close()
  skipped.close()


def _answer_of(output: str) -> str:
  start, end = output.find("<answer>"), output.find("</answer>")
  return output[start + len("<answer>"):end].strip() if 0 <= start < end else output


def _yes_probabilities(config, teacher: Teacher, items: list[TeachItem], template: Template,
                       progress: Progress, answer: Callable[[TeachItem], str] = lambda it: "",
                       skipped: shards.Shard | None = None,
                       cuts: dict[str, dict] | None = None
                       ) -> Iterable[tuple[list[TeachItem], np.ndarray]]:
  """Batches of items with P(yes) / (P(yes) + P(no)) of the teacher's first answer token after
  the template's prompt (chat format, whatever the teacher's output format)."""
  yes = first_token_ids(teacher.tok, config.verify.yes_words)
  no = first_token_ids(teacher.tok, config.verify.no_words)
  chat = dataclasses.replace(teacher, output_format="tagged")
  buckets, size = config.verify.prompt_buckets, config.generate.batch_size
  layout = batching.image_layout(teacher.model.cfg, teacher.grid)
  for kind in (False, True):  # Without images, then with: a batch runs the tower only if needed.
    group = [it for it in items if (template.image_of(it) is not None) == kind]
    for start in range(0, len(group), size):
      batch, seqs, images = [], [], []
      for it in group[start:start + size]:  # This batch's images only are decoded.
        try:
          ids, _, image = _prompt(chat, template, it, buckets, answer(it), prefixed=False,
                                  cuts=cuts)
          pixels = None if image is None else _pixels(chat, image)
        except BadItem as e:
          if skipped is None:
            raise BadItem(f"{it.where} (query {it.qid}): {e}") from e
          _skip(config, skipped, it, e, progress)
          continue
        batch.append(it)
        seqs.append(ids)
        images.append(pixels)
      if not batch:
        continue
      packed = batching.pack(seqs, images, teacher.model.cfg, teacher.grid,
                             batching.bucket(len(batch)), buckets)
      with jax.set_mesh(teacher.mesh):
        _, logits, _ = prefill(*teacher.split, *batching.on_devices(packed, teacher.mesh),
                               None if packed.pixels is None else layout,
                               jnp.asarray(packed.lengths - 1))
      del packed, images  # Not held while the caller writes and the next batch decodes.
      probs = np.asarray(jax.nn.softmax(logits, axis=-1))[:len(batch)]
      p_yes, p_no = probs[:, yes].sum(1), probs[:, no].sum(1)
      progress.add(len(batch))
      yield batch, p_yes / np.maximum(p_yes + p_no, 1e-30)


# ---------------------------------------------------------------------------------------- merge


def merge(items: list[TeachItem], out_dir: str,
          min_confidence: float = cot.MIN_CONFIDENCE) -> dict:
  """Writes the raw M-BEIR-CoT file (every routed query in file order: direct ones with no
  output; reason ones, when generated, with the attempt kept (`attempts.chosen`: the first
  accepted, else the last), its output and confidence) and the report."""
  route = routes(out_dir, items)
  generated = attempts.by_attempt(shards.read(out_dir, "generated"), ("teacher_output", "capped"))
  verified = attempts.by_attempt(shards.read(out_dir, "verified"), ("confidence",))
  skipped = {r["qid"]: r["reason"] for r in shards.read(out_dir, "skipped")}
  counts, kept = collections.Counter(), {}
  path = os.path.join(out_dir, RAW_FILE)
  with open(path + ".partial", "w", encoding="utf-8") as f:
    for it in items:
      record = {"qid": it.qid, "task_id": it.task_id, "route": route[it.qid],
                "teacher_output": None}
      if route[it.qid] == "reason":
        if it.qid not in generated:
          counts["skipped" if it.qid in skipped else "not_generated"] += 1
          continue
        tried, judged = generated[it.qid], verified.get(it.qid, {})
        attempt = attempts.chosen(tried, judged, min_confidence)
        kept[it.qid] = (tried[attempt], judged.get(attempt, {}).get("confidence"))
        record["teacher_output"] = tried[attempt]["teacher_output"]
        if kept[it.qid][1] is not None:
          record["confidence"] = kept[it.qid][1]
      counts[route[it.qid]] += 1
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
  os.replace(path + ".partial", path)
  conf = [c for _, c in kept.values() if c is not None]
  report = {"queries": len(items), "written": counts["reason"] + counts["direct"],
            "reason": counts["reason"], "direct": counts["direct"],
            "skipped": counts["skipped"], "not_generated": counts["not_generated"],
            "capped": sum(bool(r.get("capped")) for r, _ in kept.values()),
            "verified": len(conf), "mean_confidence": float(np.mean(conf)) if conf else None,
            "above_0.7": sum(c > 0.7 for c in conf),
            "accepted": sum(c is not None and not attempts.rejected(
                              r["teacher_output"], c, min_confidence) for r, c in kept.values()),
            "retried": sum(len(generated[q]) > 1 for q in kept),
            "attempts": dict(sorted(collections.Counter(str(len(generated[q])) for q in kept)
                                    .items())),
            "prompt_cuts": _cut_report(out_dir), "raw_file": path}
  with open(os.path.join(out_dir, REPORT_FILE), "w") as f:
    json.dump(report, f, indent=2)
  return report


def report_summary(report: dict) -> dict:
  """The report with each phase's cut qids as their count (the lists stay in the report file:
  at M-BEIR's size, hundreds of thousands of qids)."""
  cuts = {phase: dict(c, qids=len(c["qids"])) for phase, c in report["prompt_cuts"].items()}
  return dict(report, prompt_cuts=cuts)


def _cut_report(out_dir: str) -> dict:
  """Per phase: how many queries' prompts the budget cut, the tokens cut per field, and their
  qids (an attempt repeats its query's cut; counted once)."""
  out = {}
  for phase, name in (("routes", "assess"), ("generated", "generate"), ("verified", "verify")):
    cut = {r["qid"]: r["cut"] for r in shards.read(out_dir, phase) if r.get("cut")}
    tokens = collections.Counter()
    for c in cut.values():
      tokens.update(c)
    out[name] = {"queries": len(cut), "tokens": dict(tokens), "qids": sorted(cut)}
  return out
