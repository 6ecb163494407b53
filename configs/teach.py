"""The M-BEIR-CoT teacher (`python -m trace_jax.tools.teach`): which queries, how they are
routed, the prompt templates a teacher and a verifier see, and how the teacher generates.

Usage: --config=configs/teach.py[:world=demo,teacher=72b]. `world=demo` reads the demo world's
training files and routes its tasks 6 and 7 to reasoning (a trace_jax demo run as teacher is
prompted with its own query prompt); `teacher=72b` lays a 72B teacher out tensor-parallel over
each host's devices (one replica per host: a v5p or v6e host, never v5e, `docs/aot.md`);
`teacher=7b` places a whole 7B on each device. Both load bfloat16 parameters (the default
`param_dtype`); `param_dtype=float32` doubles the weights' memory for no gain in inference.
Templates are plain text a user edits here: `head` is shared by every query of the sub-task
(prefilled once), `body` holds the query's fields ({instruction}, {query},
{target}: the positive's text, {answer}: the output being verified), and `image` says which image
the prompt shows.
"""

import ml_collections

from configs import common

# M-BEIR's ten training sets, each with the union training pool (UniIR's layout).
MBEIR_DATASETS = ("visualnews", "mscoco", "fashion200k", "webqa", "edis", "nights", "oven",
                  "infoseek", "fashioniq", "cirr")
UNION_TRAIN_POOL = "cand_pool/global/mbeir_union_train_cand_pool.jsonl"

COMPOSED_EDIT = dict(
  head=("You are given a reference image and a request to modify it. First reason briefly, "
        "inside <reasoning>...</reasoning>, about what the reference image shows and how the "
        "request changes it. Then, inside <answer>...</answer>, describe the resulting target "
        "image in one concise phrase. Write nothing else.\n"),
  body="Modification request: {query}", image="query")
KNOWLEDGE_VQA = dict(
  head=("You are given an image and a question about it. First reason briefly, inside "
        "<reasoning>...</reasoning>, about what the image shows and what the question asks. "
        "Then, inside <answer>...</answer>, give the answer: the entity's name and a few words "
        "describing it. The correct entity is given as a hint; use it, but do not say that it "
        "was given. Write nothing else.\n"),
  body="Question: {instruction} {query}\nHint: {target}", image="query")
DESCRIBE_TARGET = dict(
  head=("You are given a retrieval query. First reason briefly, inside <reasoning>...</reasoning>,"
        " about what the item it looks for must show. Then, inside <answer>...</answer>, describe "
        "that item in one concise phrase. Write nothing else.\n"),
  body="{instruction} {query}", image="query")

VERIFY_EDIT = dict(
  head=("You are given an image and a description. Answer yes if the description matches the "
        "image, and no otherwise.\n"),
  body="Description: {answer}\nDoes the description match the image? Answer yes or no.",
  image="target")
VERIFY_KNOWLEDGE = dict(
  head=("You are given an image, a question about it, its correct answer and a proposed answer. "
        "Answer yes if the proposed answer names the correct answer without being vague, and no "
        "otherwise.\n"),
  body=("Question: {instruction} {query}\nCorrect answer: {target}\nProposed answer: {answer}\n"
        "Is the proposed answer correct? Answer yes or no."),
  image="query")
VERIFY_DESCRIPTION = dict(
  head=("You are given a retrieval query, the item it should find and a proposed description of "
        "that item. Answer yes if the description fits the item, and no otherwise.\n"),
  body=("Query: {instruction} {query}\nItem: {target}\nProposed description: {answer}\n"
        "Does the description fit the item? Answer yes or no."),
  image="target")
ASSESS = dict(
  head=("You are given a retrieval query. Answer yes if finding its target needs reasoning "
        "(applying an edit, using knowledge, combining constraints), and no if the query "
        "already describes the target plainly.\n"),
  body="Query: {instruction} {query}\nDoes it need reasoning? Answer yes or no.", image="query")


def get_config(arg: str = ""):
  args = common.parse_arg(arg, {"world": "", "teacher": "", "dtype": "bfloat16",
                                "param_dtype": "bfloat16"})
  c = ml_collections.ConfigDict()
  c.seed = 0
  # On a CPU-only host, split the CPU into this many fake devices (0 = JAX's default).
  c.cpu_devices = 0
  # (query file, candidate pool file) pairs under the M-BEIR root.
  c.files = tuple((f"query/train/mbeir_{d}_train.jsonl", UNION_TRAIN_POOL) for d in MBEIR_DATASETS)
  # The teacher's compute dtype (a Hugging Face teacher; a trace_jax run keeps its own).
  c.dtype = args["dtype"]
  # The teacher's parameter dtype (a Hugging Face teacher): bfloat16, as Qwen2.5-VL checkpoints
  # are stored and as inference needs (float32 would put a 72B at ~294 GB). `tools.aot_compile
  # --generation` compiles with this and `dtype`, so its fits are of what this tool loads.
  c.param_dtype = args["param_dtype"]
  # Each process places a whole teacher on its own devices: (data, fsdp, tensor), -1 fills.
  c.mesh = (-1, 1, 1)
  # A sample of this many queries of the selection (0: all), drawn by `seed` across datasets and
  # kept in file order: a sample to try templates on.
  c.max_queries = 0
  # Seconds between progress lines.
  c.progress_seconds = 30.0
  # The verifier's threshold, the one `build_cot --min_confidence` applies (0.7): an output at
  # or below it (or failing build_cot's structure rule) is rejected and, with sampling, retried.
  c.min_confidence = 0.7
  # Attempts per reason query: a rejected output is generated again with a fresh seed (attempt k
  # samples with seed_of(qid, seed + k)) up to this many times. Needs generate.temperature > 0:
  # greedy decoding would repeat itself, so it makes one attempt (and says so).
  c.max_attempts = 3

  c.data = ml_collections.ConfigDict()
  # A query whose image is missing or whose prompt does not fit: "error" stops naming it;
  # "skip" writes it with its reason to the `skipped` shards and counts it in the report.
  c.data.on_bad_example = "error"

  c.assess = ml_collections.ConfigDict()
  # "dataset": route by dataset (or `DATASET:task`), as the paper did in practice; "teacher":
  # ask the teacher (`template`), reasoning when its P(yes) is above `threshold`.
  c.assess.mode = "dataset"
  c.assess.reason = ("CIRR", "FashionIQ", "INFOSEEK", "OVEN")
  c.assess.template = ASSESS
  c.assess.threshold = 0.5

  c.generate = ml_collections.ConfigDict()
  # "tagged": a chat model writing <reasoning>/<answer> tags; "trace": a TRACE-trained run,
  # prompted with its own query prompt, writing "reasoning answer" (its answer is the last
  # sentence); "": tagged for a Hugging Face teacher, trace for a trace_jax run.
  c.generate.format = ""
  # Images are resized to this (t, h, w) patch grid; () = 16x16 (a trace_jax run: its own).
  c.generate.image_grid = ()
  # Prompt length buckets (after the template's shared head).
  c.generate.prompt_buckets = (256, 512)
  c.generate.batch_size = 8  # Prompts per prefill.
  c.generate.slots = 16  # Rows decoding at once (continuous batching).
  c.generate.chunk = 16  # Decoding steps per on-device loop.
  # Images are read and resized on `decode_workers` threads just before their query is
  # admitted, at most `prefetch_batches` batches ahead (host memory: ~1.2 MB an image at 16x16).
  c.generate.prefetch_batches = 4
  c.generate.decode_workers = 2
  # Reasoning (<= 256 tokens) + answer (<= 64) + tags: what the CoT filter can admit.
  c.generate.max_new_tokens = 384
  c.generate.temperature = 0.0  # 0: greedy (a rerun after a kill gives the same records).
  c.generate.top_k = 0
  c.generate.top_p = 1.0
  c.generate.stop_strings = ("</answer>",)

  c.templates = dict(composed_edit=COMPOSED_EDIT, knowledge_vqa=KNOWLEDGE_VQA,
                     describe_target=DESCRIBE_TARGET)
  # Which template a query gets: by "DATASET:task", by task id, or "default".
  c.templates_for = {"7": "composed_edit", "6": "knowledge_vqa", "8": "knowledge_vqa",
                     "default": "describe_target"}

  c.verify = ml_collections.ConfigDict()
  c.verify.templates = dict(edit=VERIFY_EDIT, knowledge=VERIFY_KNOWLEDGE,
                            description=VERIFY_DESCRIPTION)
  c.verify.templates_for = {"7": "edit", "6": "knowledge", "8": "knowledge",
                            "default": "description"}
  c.verify.prompt_buckets = (256, 512)
  # The verifier's confidence: P(yes) / (P(yes) + P(no)) over its first answer token.
  c.verify.yes_words = ("yes", "Yes")
  c.verify.no_words = ("no", "No")

  if args["teacher"] == "72b":
    c.mesh = (1, 1, -1)  # 72B in bf16 (~146 GB): tensor-parallel over a host's chips.
  elif args["teacher"] == "7b":
    c.mesh = (-1, 1, 1)  # 7B in bf16 (~16 GB): a whole replica on each chip of the host.
  elif args["teacher"]:
    raise ValueError(f"teacher={args['teacher']!r}; expected '', '7b' or '72b'")
  if args["world"] == "demo":
    from configs import demo  # noqa: PLC0415 (configs import configs, never trace_jax)
    c.files = demo.get_config().data.train_files
    c.assess.reason = ("Synthetic:6", "Synthetic:7")
    c.cpu_devices = 4
    c.generate.prompt_buckets = (64,)
    c.generate.max_new_tokens = 64
    c.verify.prompt_buckets = (256,)  # The demo tokenizer spells the templates' English out.
    c.progress_seconds = 10.0
  elif args["world"]:
    raise ValueError(f"world={args['world']!r}; expected '' or 'demo'")
  return c
