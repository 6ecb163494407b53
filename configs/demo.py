"""The embedded default: TRACE on the generated demo world, on a 2-core CPU (4 fake devices,
data-parallel; InfoNCE negatives gathered across them), the way the paper trains it: LoRA
fine-tuning of a pretrained Qwen2.5-VL-shaped backbone.

The backbone (`stage=backbone`) is a tiny Qwen2.5-VL-shaped model trained from scratch with the
language-model loss alone on the world's train split (captions, question answers and edit
descriptions: `data.target="lm"`), and written to `runs/demo_backbone/hf` as a Hugging Face
directory with its SentencePiece tokenizer, which has no `<|emb|>`. `trace_jax.main` builds it
the first time a fine-tuning config needs it and reuses it afterwards. Fine-tuning takes the path
of a released checkpoint: `ckpt.init_from`, `<|emb|>` appended to the tokenizer and its rows
added (`vocab.add_token_rows`), LoRA on the decoder, the vision tower frozen, the merger trained.

Usage: --config=configs/demo.py[:ablation=direct,steps=N,seed=S,stage=backbone,backbone=none].
`ablation=direct` is the direct-only baseline: no reasoning targets, lambda_gen = 0, the direct
encoder. `seed` seeds fine-tuning (LoRA init, data order); the backbone is the same for every
seed. `backbone=none` trains every weight from random initialisation instead (the demo before it
had a backbone; quick runs that need no pretraining, such as the tests').
"""

import ml_collections

from configs import common

WORLD = "runs/demo_world"
BACKBONE = "runs/demo_backbone"
TASKS = (0, 3, 6, 7)
# Tasks with text to learn for the backbone: captions (3), and the teacher's descriptions of
# the questioned (6) and edited (7) scenes. Task 0 (caption -> image) has none.
PRETRAIN_TASKS = (3, 6, 7)
# Data fields the fine-tuning config and its backbone's share (references: set one, both move).
WORLD_FIELDS = ("root", "generate_world", "world_seed", "world_train", "world_test",
                "world_image_size")


def get_config(arg: str = ""):
  args = common.parse_arg(arg, {"ablation": "", "steps": 600, "backbone_steps": 900,
                                "seed": 0, "stage": "finetune", "backbone": "pretrained",
                                "dtype": "float32"})
  if args["ablation"] not in ("", "direct"):
    raise ValueError(f"ablation={args['ablation']!r}; expected '' or 'direct'")
  if args["stage"] not in ("finetune", "backbone"):
    raise ValueError(f"stage={args['stage']!r}; expected 'finetune' or 'backbone'")
  if args["backbone"] not in ("pretrained", "none"):
    raise ValueError(f"backbone={args['backbone']!r}; expected 'pretrained' or 'none'")
  if args["stage"] == "backbone":
    return backbone_config(args)
  c = _world_and_model(args)
  c.seed = c.data.seed = args["seed"]
  c.total_steps = args["steps"]
  if args["backbone"] == "pretrained":
    _from_backbone(c, backbone_config(args))
  else:
    _from_random_weights(c)

  c.loss.temperature = 0.05
  c.loss.contrastive_chunk = 32
  if args["ablation"] == "direct":
    c.loss.lambda_gen = 0.0
    c.data.target = "direct"
    c.eval.mode = "direct"

  c.data.train_files = _files(TASKS)
  c.data.cot_file = "cot/train/mbeir_synthetic_cot.jsonl"

  # Prompts before reasoning are at most ~35 tokens; reasoning at most ~50.
  c.eval.prompt_buckets = (48,)
  c.eval.max_new_tokens = 56
  c.eval.after_train = True
  # Queries/s over each task's whole test set (200 queries): a sample of 64 would hold task 0's
  # one reasoning query at 3x its real share.
  c.eval.qps_queries = 200
  c.eval.qps_rounds = 5
  return c


def _from_backbone(c, pretrain):
  """Fine-tuning from the backbone `pretrain` builds, the paper's recipe at this width: LoRA on
  every decoder projection, vision tower frozen, merger trained."""
  for key in WORLD_FIELDS:  # One world: `--config.data.root=...` moves both stages.
    ref = ml_collections.FieldReference(c.data[key])
    c.data[key] = pretrain.data[key] = ref
  hf_dir = ml_collections.FieldReference(f"{BACKBONE}/hf")
  c.backbone = ml_collections.ConfigDict(dict(workdir=BACKBONE, hf_dir=hf_dir, config=pretrain))
  c.ckpt.init_from = hf_dir
  c.data.tokenizer = hf_dir + "/sentencepiece.model"
  c.lora.rank = 32
  c.lora.alpha = 64.0
  c.optim.train_vision = False
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 30
  c.optim.final_lr_fraction = 0.05
  c.optim.weight_decay = 0.0


def _from_random_weights(c):
  """Every weight trains, the vision tower included (the backbone, and `backbone=none`)."""
  c.lora.rank = 0
  c.optim.train_vision = True
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.optim.final_lr_fraction = 0.05
  c.optim.weight_decay = 0.01


def backbone_config(args):
  """The backbone's pretraining: every weight trains from scratch, LM loss only."""
  c = _world_and_model(args)
  c.total_steps = args["backbone_steps"]
  _from_random_weights(c)
  c.loss.lambda_ret = 0.0
  c.data.target = "lm"
  c.data.train_files = _files(PRETRAIN_TASKS)
  c.data.cot_file = "cot/train/mbeir_synthetic_cot.jsonl"
  # One id short of the model's 768 rows: fine-tuning appends <|emb|> as id 767.
  c.data.tokenizer_vocab = 767
  return c


def _files(tasks):
  return tuple((f"query/train/mbeir_synthetic_task{k}_train.jsonl",
                f"cand_pool/local/mbeir_synthetic_task{k}_train_cand_pool.jsonl") for k in tasks)


def _world_and_model(args):
  """What both stages share: the world, the model's shape, the mesh, batches, logging."""
  c = common.base_config()
  # 4 devices, data-parallel: on 2 cores the collectives of tensor or FSDP axes cost more than
  # they split. (FSDP meshes run too: trace_jax.devices.split_cpu gives XLA:CPU the pool threads
  # its overlapping collectives need, which used to deadlock.)
  c.cpu_devices = 4
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 4, -1, 1  # fsdp -1: the devices left (1 here)
  # Small models replicate most bytes; the check matters for the released sizes.
  c.max_replicated_fraction = 1.0

  c.model.family = "qwen2_5_vl"
  c.model.dtype = args["dtype"]
  # Recomputing the layer in the backward pass is faster on CPU than storing its activations.
  c.model.remat = "full"
  c.model.text = common.text_model(vocab_size=768, width=128, mlp_dim=256, num_layers=4,
                                   num_heads=4, num_kv_heads=2, tie_embeddings=True,
                                   mrope_section=(4, 6, 6), rope_theta=10000.0)
  c.model.vision = ml_collections.ConfigDict(dict(
    depth=2, width=64, mlp_dim=128, num_heads=2, out_width=128, patch_size=14,
    temporal_patch_size=2, spatial_merge_size=2, in_channels=3, window_size=56,
    fullatt_block_indexes=(1,), act="silu", rope_theta=10000.0, norm_eps=1e-6))

  c.loss.vocab_chunk = 512
  c.loss.max_target_tokens = 64

  c.data.root = WORLD
  c.data.generate_world = True
  c.data.global_batch = 64
  # 84x84 images: a 6x6 patch grid, 9 image tokens, one per cell of the world's 3x3 grid.
  c.data.image_grid = (1, 6, 6)
  # Compact prompts and the world's terse captions: task 0/3 queries ~33 tokens, task 6/7 queries
  # with reasoning up to 80 (mean ~62), candidates up to 20.
  c.data.query_len = 80
  c.data.query_buckets = (48,)
  c.data.cand_len = 24
  c.data.cand_buckets = ()  # (The real configs' sizes are all above 24.)
  c.data.world_train = 12000
  c.data.world_image_size = 56
  c.data.tokenizer_vocab = 768
  c.data.compact_prompts = True

  c.ckpt.every_steps = 300
  c.log.every_steps = 25
  return c
