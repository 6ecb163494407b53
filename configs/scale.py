"""The scale rehearsal's tiny model (`benchmarks/scale.py`): a Qwen2.5-VL-shaped model a 2-core
CPU runs, trained from random weights on an M-BEIR-shaped root (`benchmarks/scale_root.py`) with
a byte-level BPE tokenizer carrying Qwen2's special tokens. Its recall is noise; it exists to run
every stage over real-sized files. Not a model of any quality, and not the 7B recipe.

Usage: --config=configs/scale.py:root=DIR,tokenizer=FILE,steps=N[,batch=B,seed=S,dtype=D].
`root` is the scale root, `tokenizer` its `tokenizer.json`. Training reads the ten per-dataset
training files with the union training pool, all examples direct (no M-BEIR-CoT file: the
teacher's output would have to pass build_cot first, a separate stage), bad examples skipped and
counted.
"""

from configs import common

# M-BEIR's ten training sets (file stems), each read with the union training pool.
DATASETS = ("visualnews", "mscoco", "fashion200k", "webqa", "edis", "nights", "oven",
            "infoseek", "fashioniq", "cirr")
# Rows of the model's embedding table: the scale tokenizer's ids (at most 1,016 with Qwen2's
# specials) plus <|emb|>, padded.
VOCAB = 1024


def get_config(arg: str = ""):
  args = common.parse_arg(arg, {"root": "", "tokenizer": "", "steps": 10, "batch": 32,
                                "seed": 0, "dtype": "float32"})
  c = common.base_config()
  c.seed = c.data.seed = args["seed"]
  c.total_steps = args["steps"]
  # 2 fake devices, data-parallel (2 cores).
  c.cpu_devices = 2
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, -1, 1
  c.max_replicated_fraction = 1.0

  c.model.family = "qwen2_5_vl"
  c.model.dtype = args["dtype"]
  c.model.remat = "full"
  c.model.text = common.text_model(vocab_size=VOCAB, width=64, mlp_dim=128, num_layers=2,
                                   num_heads=2, num_kv_heads=1, tie_embeddings=True,
                                   mrope_section=(4, 6, 6), rope_theta=10000.0)
  c.model.vision = common.qwen2_5_vl_vision(out_width=64)
  c.model.vision.update(depth=2, width=32, mlp_dim=64, num_heads=2, window_size=56,
                        fullatt_block_indexes=(1,))

  # Every weight trains from random initialisation (there is no backbone at this shape).
  c.lora.rank = 0
  c.optim.train_vision = True
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 2
  c.loss.vocab_chunk = 512
  c.loss.max_target_tokens = 32
  c.loss.contrastive_chunk = 16

  c.data.root = args["root"]
  c.data.tokenizer = args["tokenizer"]
  c.data.train_files = tuple((f"query/train/mbeir_{d}_train.jsonl",
                              "cand_pool/global/mbeir_union_train_cand_pool.jsonl")
                             for d in DATASETS)
  c.data.target = "direct"
  c.data.global_batch = args["batch"]
  # 56x56 images: a 4x4 patch grid, 4 image tokens.
  c.data.image_grid = (1, 4, 4)
  # Full prompts (system turn included), as the real runs use. Queries: prompt + instruction +
  # at most 60 words; candidates: the real configs' candidate-length policy (data.cand_len 1280
  # and its buckets, common.py: a Wikipedia passage keeps LamRA's 1,024 text tokens).
  c.data.query_len = 160
  c.data.query_buckets = (96,)
  # The root's bad rows (a missing image, an empty text) are skipped and counted.
  c.data.on_bad_example = "skip"
  c.data.workers = 0

  c.eval.mode = "adaptive"
  c.eval.mesh = (-1, 1, 1)
  c.eval.batch_size = 32
  # Queries fit 160; candidates follow the training policy up to data.cand_len (1280).
  c.eval.prompt_buckets = (64, 160, 256, 512, 1280)
  c.eval.max_new_tokens = 8
  c.eval.qps_queries = 0

  c.ckpt.every_steps = 1000
  c.log.every_steps = 5
  return c
