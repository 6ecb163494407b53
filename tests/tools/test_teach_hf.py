"""The teacher from a Hugging Face directory, end to end: a tiny random Qwen2.5-VL written with
`save_pretrained` next to a tokenizer whose config holds a chat template, loaded by
`load_teacher`'s Hugging Face branch, through assess (`mode=teacher`), generate, verify and the
merge, then `build_cot`'s filters with the confidence and length rules on.

A random model writes garbage, so this checks mechanics: the prompt ids the teacher builds are
what the tokenizer's own chat template gives; generation stops where transformers' `generate`
stops with the same stop ids (`<|im_end|>` made the model's greedy choice on the way) and a
stop string cuts the text right after it; assess writes routes from `p_reason`, verify writes
confidences, and build_cot counts a reason for every record it drops.
"""

import collections
import json
import os

import pytest
import torch
import transformers

from configs import teach as teach_config
from tests.data.tokenizer_fixture import qwen_like_tokenizer, write_hf_dir
from tests.model import reference
from tests.model.reference import Case
from trace_jax.data import cot, cot_build, synthetic
from trace_jax.data import image as image_lib
from trace_jax.teach import phases, shards
from trace_jax.teach.items import load_items
from trace_jax.teach.loading import load_teacher
from trace_jax.teach.prompting import SYSTEM, Template

GRID = (1, 4, 4)  # 4 image tokens after the 2x2 merge.
MAX_NEW = 6
# Qwen2-VL's chat layout, written for this test: a default system turn, then each turn's text and
# images in order (an image as one <|image_pad|>, which the processor repeats per merged patch).
CHAT_TEMPLATE = (
  "{% for m in messages %}"
  "{% if loop.first and m['role'] != 'system' %}"
  "{{ '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' }}{% endif %}"
  "{{ '<|im_start|>' + m['role'] + '\\n' }}"
  "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
  "{% if p['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
  "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
  "{{ '<|im_end|>\\n' }}{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def write_teacher(path: str):
  """A random tiny Qwen2.5-VL over the tiny tokenizer (its specials as the image ids), saved
  with the tokenizer files and the chat template; returns the transformers model."""
  tok = qwen_like_tokenizer()
  ids = {k: tok.token_to_id(t) for k, t in (
    ("image_token_id", "<|image_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
    ("vision_end_token_id", "<|vision_end|>"), ("video_token_id", "<|endoftext|>"))}
  cfg = reference.hf_config(Case("v25", "qwen2_5_vl", kv_heads=2, tie=False, grids=()),
                            vocab=tok.get_vocab_size(with_added_tokens=True))
  for k, v in ids.items():
    setattr(cfg, k, v)
  torch.manual_seed(0)
  model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
  model.save_pretrained(path)
  write_hf_dir(path, tok, "PreTrainedTokenizerFast")
  with open(os.path.join(path, "tokenizer_config.json")) as f:
    config = json.load(f)
  config["chat_template"] = CHAT_TEMPLATE
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  return model


def hf_generate(model, teacher, config, it, stops) -> list[int]:
  """transformers' greedy tokens for the teacher's prompt of `it`, stopping at `stops`."""
  template = Template(**config.templates[phases._template_name(config.templates_for, it)])
  ids, _, image = phases._prompt(teacher, template, it, (2048,), answer="")
  kw = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=int)}
  if image is not None:
    pixels = image_lib.resize_to_grid(os.path.join(teacher.root, image), GRID[1:])[0]
    kw.update(pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor([GRID]))
  kw["mm_token_type_ids"] = (kw["input_ids"] == teacher.model.cfg.image_token_id).long()
  with torch.no_grad():
    out = model.generate(**kw, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=list(stops),
                         pad_token_id=stops[0])
  new = out[0, len(ids):].tolist()
  end = next((i for i, t in enumerate(new) if t in stops), None)
  return new if end is None else new[:end + 1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(config, world, HF dir, four queries (tasks 0, 3, 7, 7), teacher, transformers' outputs).

  `<|im_end|>` is made the model's greedy choice on the way: its output row is swapped with that
  of a token X the first query writes third (the prompts are unchanged, so every row writes
  `<|im_end|>` where it wrote X, and stops there)."""
  tmp = tmp_path_factory.mktemp("teach_hf")
  root = str(tmp / "world")
  synthetic.generate_world(root, n_train=24, n_test=2)
  hf_dir = str(tmp / "hf")
  model = write_teacher(hf_dir)
  config = teach_config.get_config("world=demo,dtype=float32,param_dtype=float32")
  config.generate.image_grid = GRID
  config.generate.max_new_tokens = MAX_NEW
  config.generate.prompt_buckets = (128,)  # After the template's head.
  config.verify.prompt_buckets = (512,)
  config.generate.slots = config.generate.batch_size = 4
  # One template per phase: each template is a shared prefix of its own, programs of its own.
  config.templates_for = {"default": "describe_target"}
  config.verify.templates_for = {"default": "description"}
  config.assess.mode = "teacher"
  config.assess.threshold = 0.0  # Every query reasons (P(yes) > 0), so every phase has work.
  items = load_items(root, config.files)
  # A text and an image query, two (image, text) -> image ones: assess (query images) and
  # verify (the positives' images) then batch one text row and three image rows alike, and
  # verify runs on assess's programs.
  items = [it for t, k in ((0, 1), (3, 1), (7, 2)) for it in
           [it for it in items if it.task_id == t][:k]]
  teacher = load_teacher(hf_dir, config, root)
  stops, _ = phases._stops(teacher, config.generate)
  free = [hf_generate(model, teacher, config, it, stops) for it in items]
  x, end = free[0][2], teacher.tok.token_to_id("<|im_end|>")
  with torch.no_grad():
    w = model.lm_head.weight
    w[[x, end]] = w[[end, x]]
  model.save_pretrained(hf_dir)
  teacher = load_teacher(hf_dir, config, root)
  want = {it.qid: hf_generate(model, teacher, config, it, stops) for it in items}
  return config, root, hf_dir, items, teacher, want


def test_prompt_ids_equal_the_chat_template(setup):
  """Every template's prompt for a query with and without an image, as the teacher builds it,
  equals the tokenizer's chat template over the same messages (the image's pad repeated)."""
  config, _, hf_dir, items, teacher, _ = setup
  hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
  templates = {**config.templates, **config.verify.templates, "assess": config.assess.template}
  for name, fields in templates.items():
    template = Template(**fields)
    for it in items:
      ids, shared, image = phases._prompt(teacher, template, it, (2048,), answer="an answer")
      content = [{"type": "text", "text": template.head}]
      content += [{"type": "image"}] if image is not None else []
      content += [{"type": "text", "text": template.fill(it, "an answer")}]
      text = hf.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                    add_generation_prompt=True)
      text = text.replace("<|image_pad|>", "<|image_pad|>" * teacher.image_tokens)
      assert ids == hf(text, add_special_tokens=False)["input_ids"], (name, it.qid)
      assert ids[:shared] == phases._shared_prefix(teacher, template)


def test_requests_decode_no_image_until_the_engine_asks(setup, tmp_path, monkeypatch):
  """The generate phase's requests are built one at a time as they are read, each image a
  function the engine's workers call (none is decoded while the requests are built)."""
  config, _, _, items, teacher, _ = setup
  calls = []
  resize = phases.image_lib.resize_to_grid
  monkeypatch.setattr(phases.image_lib, "resize_to_grid",
                      lambda *a, **k: calls.append(a[0]) or resize(*a, **k))
  template = Template(**config.templates["describe_target"])
  reqs = phases._requests(config, teacher, template, items, shards.Shard(str(tmp_path), "skip"),
                          phases.Progress("generate", len(items), 1e9), cuts={},
                          attempt={it.qid: 0 for it in items})
  built = list(reqs)
  assert [r.tag for r in built] == items and not calls
  lazy = [r for r in built if r.pixels is not None]
  assert len(lazy) == 3 and all(callable(r.pixels) for r in lazy)
  assert lazy[0].pixels().shape == (16, 1176) and len(calls) == 1


def test_all_phases_then_build_cot(setup, tmp_path):
  config, root, _, items, teacher, want = setup
  out = str(tmp_path / "teach")
  phases.assess(config, teacher, items, out)
  routes = {r["qid"]: r for r in shards.read(out, "routes")}
  assert sorted(routes) == sorted(it.qid for it in items)
  for r in routes.values():
    assert 0 < r["p_reason"] < 1 and r["route"] == "reason"

  stops, _ = phases._stops(teacher, config.generate)
  tok = teacher.tok
  ended = [q for q, t in want.items() if t[-1] in stops]
  assert ended and len(ended) < len(want)  # <|im_end|> ends some rows early, not all.
  # A stop string the model writes: the text of the second and third tokens of a row that runs
  # to the limit (a random model never writes `</answer>` itself).
  full = next(t for t in want.values() if len(t) == MAX_NEW)
  stop_string = tok.decode(full[1:3])
  config.generate.stop_strings = ("</answer>", stop_string)
  phases.generate(config, teacher, items, out)
  generated = {r["qid"]: r for r in shards.read(out, "generated")}
  assert sorted(generated) == sorted(want)
  for qid, tokens in want.items():
    text = tok.decode([t for t in tokens if t not in stops])
    if stop_string in text:
      n = next(n for n in range(1, len(tokens) + 1) if stop_string in tok.decode(tokens[:n]))
      tokens, text = tokens[:n], tok.decode(tokens[:n])
    assert generated[qid]["new_tokens"] == len(tokens), qid
    assert generated[qid]["teacher_output"] == text.strip(), qid
    assert generated[qid]["capped"] == (len(tokens) == MAX_NEW and tokens[-1] not in stops)
  assert any(stop_string in tok.decode(want[q]) for q in want)

  phases.verify(config, teacher, items, out)
  confidence = {r["qid"]: r["confidence"] for r in shards.read(out, "verified")}
  assert sorted(confidence) == sorted(want) and all(0 < c < 1 for c in confidence.values())
  report = phases.merge(items, out)
  assert report["reason"] == report["verified"] == len(items) and report["skipped"] == 0

  built = str(tmp_path / "cot.jsonl")
  files = [os.path.join(root, q) for q, _ in config.files]
  pools = [os.path.join(root, p) for _, p in config.files]
  rules = cot.FilterConfig(min_reasoning_tokens=1, min_answer_tokens=1, min_confidence=0.7)
  result = cot_build.build(os.path.join(out, phases.RAW_FILE), files, pools, built, cfg=rules)
  assert result.read == len(items)
  assert sum(result.dropped.values()) + sum(result.kept.values()) == len(items)
  with open(result.dropped_path) as f:
    dropped = [json.loads(line) for line in f]
  assert sorted(r["qid"] for r in dropped) == sorted(
    q for q in want if q not in {r.qid for r in cot.read_cot(built).values()})
  counted = collections.Counter(r["reason"] for r in dropped)
  assert counted == {k: v for k, v in result.dropped.items() if v}
