"""Shared config skeleton and the `key=value,...` argument parser of every config file.

Configs are data: this file imports neither jax nor trace_jax.
"""

import ast

import ml_collections


def parse_arg(arg: str, defaults: dict) -> dict:
  """Parses `a=1,b=x` against `defaults`; unknown keys raise, values keep the default's type."""
  out = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"config argument {item!r} is not key=value")
    if key not in defaults:
      raise KeyError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif isinstance(default, (int, float)):
      out[key] = type(default)(ast.literal_eval(value))
    else:
      out[key] = value
  return out


def base_config() -> ml_collections.ConfigDict:
  """Sections every experiment has; model files fill `model`."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 0

  c.model = ml_collections.ConfigDict()
  # "qwen2_vl" or "qwen2_5_vl": picks the vision block (LayerNorm+GELU vs RMSNorm+SwiGLU+windows).
  c.model.family = "qwen2_5_vl"
  # Compute dtype; parameters are kept in param_dtype (bf16 compute, fp32 params for training).
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  # Rematerialisation of each scanned layer in the backward pass: none | full | dots.
  c.model.remat = "none"
  c.model.image_token_id = 151655
  c.model.video_token_id = 151656
  c.model.vision_start_token_id = 151652
  c.model.vision_end_token_id = 151653

  # On a CPU-only host, split the CPU into this many fake devices (0 = leave JAX's default).
  c.cpu_devices = 0

  c.mesh = ml_collections.ConfigDict()
  # Mesh axis sizes; one may be -1 to take the remaining devices.
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1

  # Logical axis -> mesh axes (see trace_jax/sharding.py); None keeps the built-in table.
  c.sharding_rules = None
  # Fail at start-up when more than this fraction of parameter bytes is replicated.
  c.max_replicated_fraction = 0.5

  c.lora = ml_collections.ConfigDict()
  # LoRA on the decoder (paper: r=128, alpha=256); rank 0 = full fine-tuning of the LLM.
  c.lora.rank = 128
  c.lora.alpha = 256.0
  c.lora.dropout = 0.0
  # Decoder projections that get adapters: any of q, k, v, o, gate, up, down.
  c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")

  c.loss = ml_collections.ConfigDict()
  c.loss.lambda_gen = 1.0
  c.loss.lambda_ret = 1.0
  # InfoNCE temperature: the initial value when learned.
  c.loss.temperature = 0.02
  c.loss.learn_temperature = False
  # Add the candidate->query InfoNCE term (averaged with query->candidate).
  c.loss.symmetric = False
  # Contrastive implementation: global (one matrix) | shard_map (explicit all_gather) | chunked.
  c.loss.contrastive_impl = "chunked"
  c.loss.contrastive_chunk = 256
  # Vocabulary chunk of the streamed LM cross-entropy.
  c.loss.vocab_chunk = 8192
  # LM-loss slots per query: a longer target loses its first tokens (counted in
  # `lm/dropped_targets`), never its answer and <|emb|>. Default: the longest target the CoT
  # filter admits (256 reasoning + 64 answer tokens + 16 for joins, marker and <|emb|>;
  # `data.cot.MAX_TARGET_TOKENS`).
  c.loss.max_target_tokens = 336
  # Embedding readout: pre_token (paper default) | emb (the <|emb|> token) | end_of_reasoning
  # (the last end-of-reasoning marker before <|emb|>; needs data.reasoning_marker).
  c.loss.readout = "pre_token"
  # The <|emb|> id (training takes it from the tokenizer).
  c.loss.emb_token_id = 151665

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 100
  # Cosine decay to lr * final_lr_fraction at total_steps.
  c.optim.final_lr_fraction = 0.0
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip = 1.0
  # GradCache micro-batches per step (1 = one shot); the negatives stay the global batch.
  c.optim.micro_batches = 1
  # Train the vision tower too (the paper freezes it; the from-scratch demo cannot).
  c.optim.train_vision = False

  c.data = ml_collections.ConfigDict()
  # Global batch (queries per step; each brings one candidate, the negatives of all others).
  c.data.global_batch = 1024
  # Static bucket shapes: query tokens (instruction + prompt + image + reasoning + <|emb|>),
  # candidate tokens, and the (t, h, w) patch grid every image of a bucket is resized to.
  c.data.query_len = 512
  # The longest candidate, in training and in evaluation (the candidate-length policy,
  # docs/data.md): LamRA's 1024 text tokens + 64 image tokens + the full prompt's fixed parts
  # (~40 Qwen tokens; at most 134 under any byte-level tokenizer: a token holds >= 1 byte).
  c.data.cand_len = 1280
  c.data.image_grid = (1, 16, 16)
  # Smaller padding buckets below query_len / cand_len (each adds one compiled step program; a
  # batch pads to the smallest that holds its longest row). Candidates: image + caption and
  # short texts fit 128 or 256, snippets 512; only batches with a longer text pay for 1280.
  c.data.query_buckets = ()
  c.data.cand_buckets = (128, 256, 512)
  # Truncation (LamRA's policy): the query text (instruction included) is cut to this many
  # tokens, the candidate text to `cand_text_tokens`, and both further so that the sequence fits
  # query_len / cand_len; the instruction, image tokens, rule and target stay whole. Cuts are
  # counted (`data/truncated_texts`) and logged with the example's id. 0 = no limit of its own.
  # Evaluation cuts candidates by the same two limits (cand_text_tokens, cand_len).
  c.data.query_text_tokens = 480
  c.data.cand_text_tokens = 1024
  # An M-BEIR-format root (real M-BEIR, or the demo world generated there when asked).
  c.data.root = ""
  c.data.generate_world = False
  c.data.world_seed = 0
  c.data.world_train = 4000
  c.data.world_test = 200
  # Side of the generated images in pixels; drawn at the size `image_grid` resizes to (14 px per
  # patch), they lose no sharpness to resampling.
  c.data.world_image_size = 56
  # (query file, candidate pool file) pairs under root, and the M-BEIR-CoT file ("" = all direct).
  c.data.train_files = (("query/union_train/mbeir_union_up_train.jsonl",
                         "cand_pool/global/mbeir_union_train_cand_pool.jsonl"),)
  c.data.cot_file = ""
  # A query of train_files without a record in cot_file: "error" stops naming it; "drop" leaves
  # it out of training, counted in the log (a file build_cot filtered lists the kept queries).
  c.data.cot_missing = "error"
  # Datasets of train_files that cot_file may leave uncovered (no record of any of their
  # queries, e.g. a teacher run over --datasets=cirr): their queries are dropped, counted in the
  # log. Any other uncovered dataset is an error naming it. Names as in mbeir.DATASET_IDS, any
  # case, e.g. ("oven", "infoseek").
  c.data.cot_drop_datasets = ()
  # ArrayRecord shards written by tools/convert_examples (images inline); when set, the pipeline
  # reads them instead of the files above.
  c.data.shards_dir = ""
  # What a reasoning query learns before <|emb|>: full (reasoning + answer) | answer | reasoning;
  # direct = the direct-only ablation (<|emb|> alone for every query).
  c.data.target = "full"
  # Write an end-of-reasoning marker token (`</think>`) after the reasoning, before the answer;
  # the tokenizer gets it as one token (loss.readout=end_of_reasoning reads it).
  c.data.reasoning_marker = False
  # Candidate-side reasoning (paper ablation): none (candidates embed at once, the paper's
  # setting) | answer | full: the positive candidate of a reasoning query learns to write that
  # part of the query's teacher output first (its LM loss joins L_gen); candidates are then
  # encoded by generation. Raise data.cand_len to fit it.
  c.data.cand_target = "none"
  # One hard negative per query beside the in-batch ones (trace_jax/data/negatives.py): none |
  # listed (one of the query's neg_cand_list; a query listing none draws from its pool) | pool.
  c.data.hard_negatives = "none"
  # Instruction prompt per query: "first" or "random" (UniIR draws one at random).
  c.data.instruction_mode = "random"
  # A tokenizer.json (Hugging Face) or .model (SentencePiece); "" = train one on the demo world.
  c.data.tokenizer = ""
  c.data.tokenizer_vocab = 512
  # No system turn and one-line rules (the CPU demo's short sequences); False = full prompts.
  c.data.compact_prompts = False
  # Sampling weight per task id, e.g. {"0": 1, "7": 3}; empty = proportional to task size.
  c.data.task_weights = {}
  c.data.one_task_per_batch = False
  # Bad example (missing image, too long even without its text, empty candidate): "error" stops
  # with its id; "skip" drops it, logs it with its reason and counts it in
  # data/skipped_examples (all processes).
  c.data.on_bad_example = "error"
  # Under "skip": stop with an error when more than this fraction of any window of
  # `skip_window` examples drawn by a process is bad.
  c.data.max_skip_fraction = 0.1
  c.data.skip_window = 1000
  # Grain worker processes decoding images (0 = in the training process).
  c.data.workers = 0
  # Fixed data shards (0 = one per process). Process p reads a contiguous run of them, so a run
  # sees the same global batches on any number of processes that divides this.
  c.data.data_shards = 0
  c.data.seed = 0

  c.ckpt = ml_collections.ConfigDict()
  # A Hugging Face directory or an Orbax checkpoint from tools/import_hf to start from ("" = none).
  c.ckpt.init_from = ""
  # Save (asynchronously) every this many steps and at the end; keep the newest `keep`.
  c.ckpt.every_steps = 500
  c.ckpt.keep = 3

  c.eval = ml_collections.ConfigDict()
  # Query encoder mode of the recall numbers: adaptive (TRACE) | direct | always_reason.
  c.eval.mode = "adaptive"
  # M-BEIR task names to evaluate (empty: all 16, or every task of the demo world).
  c.eval.tasks = ()
  # "local": each task's own pool (the reported M-BEIR setting); "global": the union test pool.
  c.eval.pool = "local"
  # Query instructions: "first" (each row's first prompt, deterministic) or "random" (UniIR's
  # draw at evaluation, seeded per task by instruction_seed); results name the mode.
  c.eval.instruction_mode = "first"
  c.eval.instruction_seed = 0
  # Candidate embeddings on disk under WORKDIR/eval/pools: float32 or bfloat16 (half the disk;
  # the union pool is ~80 GB in float32 at width 3584).
  c.eval.embedding_dtype = "float32"
  # Pool candidates encoded and saved per chunk: a stopped encoding resumes at its first
  # incomplete chunk (and the encoding holds one chunk's texts and embeddings at a time).
  c.eval.pool_chunk = 4096
  # Threads decoding the images of the next batch while the current one runs on the devices.
  c.eval.image_workers = 4
  # Each process places a whole model on its own devices: (data, fsdp, tensor) sizes, -1 fills.
  # (-1, 1, 1) replicates it on every device; (1, -1, 1) shards it over the host's devices.
  c.eval.mesh = (-1, 1, 1)
  # Dtype the trained weights are restored in for evaluation (float32 | bfloat16); only the
  # parameters are read, LoRA adapters are folded in float32 first. bfloat16 halves the weights'
  # memory; the compute dtype (model.dtype) is unchanged.
  c.eval.param_dtype = "float32"
  # Query text cut to this many tokens at evaluation (0: only to fit eval.prompt_buckets);
  # candidates follow data.cand_text_tokens.
  c.eval.query_text_tokens = 0
  c.eval.batch_size = 32
  # Padding buckets of the encoder's prompts (queries and candidates). The largest must hold a
  # candidate of data.cand_len (its prompt: data.cand_len - 1 tokens, <|emb|> read after it).
  c.eval.prompt_buckets = (64, 128, 256, 512, 1280)
  # Longest reasoning the encoder writes before it must emit <|emb|>; a row that reaches it is
  # read where it stopped and counted in results.json (`capped_rate`). Default: the longest
  # target the CoT filter admits (as loss.max_target_tokens).
  c.eval.max_new_tokens = 336
  # Decoding steps per on-device loop; the decode batch is compacted between loops.
  c.eval.decode_chunk = 16
  # Queries per task timed in each encoder mode for queries/s (0 = skip the timing).
  c.eval.qps_queries = 64
  # Timed rounds per task (modes alternate; each mode keeps its fastest round).
  c.eval.qps_rounds = 3
  # trace_jax.main evaluates the final checkpoint, prints a summary and writes plots (one process).
  c.eval.after_train = False

  c.log = ml_collections.ConfigDict()
  # Metrics to WORKDIR/metrics.jsonl and a progress line on process 0, every this many steps.
  c.log.every_steps = 10
  # Profiler trace of steps [start, stop) into WORKDIR/profile, e.g. (10, 13); () = none.
  c.log.profile_steps = ()
  return c


def text_model(vocab_size, width, mlp_dim, num_layers, num_heads, num_kv_heads, tie_embeddings,
               mrope_section=(16, 24, 24), rope_theta=1000000.0, rms_norm_eps=1e-6):
  return ml_collections.ConfigDict(dict(
    vocab_size=vocab_size, width=width, mlp_dim=mlp_dim, num_layers=num_layers,
    num_heads=num_heads, num_kv_heads=num_kv_heads, mrope_section=mrope_section,
    rope_theta=rope_theta, rms_norm_eps=rms_norm_eps, tie_embeddings=tie_embeddings))


def qwen2_vl_vision(out_width):
  """The Qwen2-VL ViT (675M): LayerNorm + QuickGELU blocks, full attention everywhere."""
  return ml_collections.ConfigDict(dict(
    depth=32, width=1280, mlp_dim=5120, num_heads=16, out_width=out_width, patch_size=14,
    temporal_patch_size=2, spatial_merge_size=2, in_channels=3, window_size=112,
    fullatt_block_indexes=(), act="quick_gelu", rope_theta=10000.0, norm_eps=1e-6))


def qwen2_5_vl_vision(out_width):
  """The Qwen2.5-VL ViT: RMSNorm + SwiGLU blocks, 112-px windows, full attention in 4 blocks."""
  return ml_collections.ConfigDict(dict(
    depth=32, width=1280, mlp_dim=3420, num_heads=16, out_width=out_width, patch_size=14,
    temporal_patch_size=2, spatial_merge_size=2, in_channels=3, window_size=112,
    fullatt_block_indexes=(7, 15, 23, 31), act="silu", rope_theta=10000.0, norm_eps=1e-6))


def released_model_config(arg: str, family: str, text: ml_collections.ConfigDict):
  """A config for a released checkpoint's architecture; `arg` sets dtype, param_dtype, remat."""
  args = parse_arg(arg, {"dtype": "bfloat16", "param_dtype": "float32", "remat": "full"})
  c = base_config()
  c.model.family = family
  c.model.dtype = args["dtype"]
  c.model.param_dtype = args["param_dtype"]
  c.model.remat = args["remat"]
  c.model.text = text
  vision = qwen2_vl_vision if family == "qwen2_vl" else qwen2_5_vl_vision
  c.model.vision = vision(out_width=text.width)
  # Released backbones compute in bfloat16 (model.dtype) and their frozen weights are bfloat16
  # values already: bfloat16 weights at evaluation take ~17 GB instead of ~33 GB for the 7B;
  # only the trained projector's and the folded adapters' last bits change.
  c.eval.param_dtype = "bfloat16"
  return c
