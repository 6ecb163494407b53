"""The full TRACE train step in trace_jax against PyTorch + transformers, side by side.

    python -m benchmarks.train_step [--rounds=3] [--steps=3] [--devices=1]
    python -m benchmarks.train_step --text_rows=0.5 [--rounds=3] [--steps=3]

Bench config (documented in docs/benchmarks.md): Qwen2.5-VL-shaped, decoder width 512, 8 layers,
8 heads / 2 KV heads, MLP 1536, vocab 4096; vision tower 2 blocks of width 256 (frozen on both
sides); batch 16 queries of 512 text tokens + one 16x16-patch image (64 image tokens) and 16 text
candidates of 64 tokens; LM loss on the last 64 query tokens, InfoNCE (tau 0.05) over the batch;
AdamW on the decoder, embeddings and merger. Both sides start from the same weights (one
`save_pretrained` directory) and see the same batch. The two are timed alternately for `--rounds`
rounds of `--steps` steps after a warm-up; the script also measures this machine's peak fp32
matmul FLOP/s with a large matrix product and reports model FLOPs utilisation. Last line: JSON
`{"tokens_per_s", "ref_tokens_per_s", "ratio", "mfu"}`.

`--text_rows=F` times the vision tower in a mixed batch instead (`mixed`, trace_jax only, one
device): a fraction F of the queries without an image, the step as the pipeline feeds it (the
tower over every row, blank pixels for the text rows) against the tower over the image rows only
(emulated here: the pipeline and the step do not do that) and against no tower; it prints
ms/step of each, the two losses (equal: the text rows' features are discarded), and the tower's
FLOP share of the 7B config's step. Last line: JSON.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from trace_jax import devices as trace_devices

B, TEXT, IMG_GRID, CAND, TARGETS, TAU = 16, 512, (1, 16, 16), 64, 64, 0.05
IMAGE, VSTART, VEND = 4000, 4001, 4002


def hf_config():
  import transformers
  text = dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12],
                               "rope_theta": 10000.0})
  vision = dict(depth=2, hidden_size=256, intermediate_size=512, num_heads=4,
                out_hidden_size=512, fullatt_block_indexes=[1], window_size=112)
  return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                       image_token_id=IMAGE, video_token_id=4003,
                                       vision_start_token_id=VSTART, vision_end_token_id=VEND)


def batch_arrays(seed=0):
  import numpy as np
  rng = np.random.default_rng(seed)
  n_img = int(np.prod(IMG_GRID)) // 4
  q = rng.integers(0, 3900, (B, TEXT + n_img + 2))
  q[:, 4], q[:, 5:5 + n_img], q[:, 5 + n_img] = VSTART, IMAGE, VEND
  c = rng.integers(0, 3900, (B, CAND))
  pixels = rng.standard_normal((B, int(np.prod(IMG_GRID)), 1176)).astype(np.float32)
  return q.astype(np.int32), c.astype(np.int32), pixels


def model_flops(cfg_text, tokens_q, tokens_c) -> float:
  """6 x trained matmul params x tokens (decoder) + attention + LM head at targets (forward and
  backward); the frozen vision tower's forward is counted once (2 x params x patches)."""
  d, f, L = cfg_text.hidden_size, cfg_text.intermediate_size, cfg_text.num_hidden_layers
  h = d // cfg_text.num_attention_heads
  qkv = d * (cfg_text.num_attention_heads + 2 * cfg_text.num_key_value_heads) * h
  layer = qkv + d * d + 3 * d * f
  tokens = B * (tokens_q + tokens_c)
  attn = 4 * L * d * B * (tokens_q**2 + tokens_c**2)
  head = 2 * d * cfg_text.vocab_size * B * TARGETS
  vit = 2 * B * 256 * (2 * (4 * 256**2 + 3 * 256 * 512))
  return 3 * (2 * L * layer * tokens + attn + head) + vit


def peak_flops() -> float:
  import jax
  import jax.numpy as jnp
  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(5):
    f(a).block_until_ready()
  return 5 * 2 * n**3 / (time.perf_counter() - start)


def torch_runner(hf_dir, q, c, pixels):
  import torch
  import transformers
  torch.manual_seed(0)
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  # JAX's default fp32 matmul precision on NVIDIA GPUs is TF32; give PyTorch the same.
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
    hf_dir, dtype=torch.float32).to(dev)
  model.train()
  for p in model.model.visual.parameters():
    p.requires_grad_(False)
  for p in model.model.visual.merger.parameters():
    p.requires_grad_(True)
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
  qt = torch.tensor(q, dtype=torch.long, device=dev)
  ct = torch.tensor(c, dtype=torch.long, device=dev)
  pix = torch.tensor(pixels.reshape(-1, pixels.shape[-1]), device=dev)
  grid = torch.tensor([IMG_GRID] * B, device=dev)
  mm = (qt == IMAGE).long()
  labels = torch.arange(B, device=dev)

  def step():
    out = model(input_ids=qt, pixel_values=pix, image_grid_thw=grid, mm_token_type_ids=mm,
                output_hidden_states=True, logits_to_keep=TARGETS + 1)
    lm = torch.nn.functional.cross_entropy(
      out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), qt[:, -TARGETS:].reshape(-1))
    qe = torch.nn.functional.normalize(out.hidden_states[-1][:, -1], dim=-1)
    ce = torch.nn.functional.normalize(
      model(input_ids=ct, output_hidden_states=True, logits_to_keep=1).hidden_states[-1][:, -1],
      dim=-1)
    ret = torch.nn.functional.cross_entropy(qe @ ce.T / TAU, labels)
    opt.zero_grad()
    (lm + ret).backward()
    opt.step()
    if dev == "cuda":
      torch.cuda.synchronize()
  return step


EMB = 4095  # The last query / candidate token plays <|emb|>: read the position before it.


def jax_step(hf_dir, devices):
  """(mesh, model config, jitted train step, initial state) of the bench model."""
  import jax
  from ml_collections import ConfigDict

  from trace_jax import sharding
  from trace_jax.model.hf_io import load_hf
  from trace_jax.train import state as state_lib
  from trace_jax.train.step import StepConfig, make_train_step
  mesh = sharding.make_mesh(1, -1, 1, devices=jax.devices()[:devices])
  model, cfg = load_hf(hf_dir, dtype="float32", mesh=mesh)
  optim = ConfigDict(dict(lr=1e-4, warmup_steps=0, final_lr_fraction=1.0, weight_decay=0.01,
                          b1=0.9, b2=0.999, eps=1e-8, grad_clip=0.0))
  tx, schedule = state_lib.make_optimizer(optim, 100)
  graphdef, st = state_lib.init_state(model, tx, lora_rank=0, temperature=TAU,
                                      learn_temperature=False, mesh=mesh)
  step_fn = make_train_step(graphdef, StepConfig(emb_token_id=EMB, temperature=TAU,
                                                 contrastive_impl="global", vocab_chunk=4096,
                                                 max_target_tokens=TARGETS),
                            tx, schedule, mesh, state_lib.shardings_of(st))
  return mesh, cfg, step_fn, st


def jax_batch(cfg, q, c, pixels, mesh, image_rows=None):
  """The bench batch on `mesh`; `image_rows` [B] bool: the queries with an image (default all;
  pixels are then given for those rows only when `pixels` has fewer rows than the batch)."""
  import jax
  import numpy as np

  from trace_jax.data.batch import batch_shardings
  from trace_jax.model.positions import rope_index, vision_layout
  q, c = q.copy(), c.copy()
  q[:, -1], c[:, -1] = EMB, EMB
  target = np.zeros_like(q)
  target[:, -TARGETS:] = 1
  image_rows = np.ones(B, bool) if image_rows is None else image_rows
  grid = np.where(image_rows[:, None], np.asarray([IMG_GRID]), 0)
  positions = rope_index(q, None, grid[image_rows] if image_rows.any() else None, cfg)
  batch = {"query_ids": q, "query_mask": np.ones_like(q), "query_target_mask": target,
           "query_positions": positions, "cand_ids": c, "cand_mask": np.ones_like(c),
           "cand_positions": rope_index(c, None, None, cfg)}
  if pixels is not None:
    batch["query_pixels"] = pixels
    batch["query_layout"] = vision_layout(np.asarray([IMG_GRID]), cfg.vision, windowed=True)
  return jax.tree.map(jax.device_put, batch, batch_shardings(batch, mesh))


def jax_runner(hf_dir, q, c, pixels, devices):
  import jax
  mesh, cfg, step_fn, st = jax_step(hf_dir, devices)
  batch = jax_batch(cfg, q, c, pixels, mesh)
  box = {"state": st}

  def step():
    with jax.set_mesh(mesh):
      box["state"], m = step_fn(box["state"], batch)
    jax.block_until_ready(m)
  return step


def merge_image_rows_only():
  """Lets the model take pixels of the image rows only: features of fewer rows than the batch
  are written over the image tokens in row order (the model's flat merge). One device only: on
  a mesh that merge gathers every row's features across devices."""
  from trace_jax.model import qwen_vl
  per_row = qwen_vl.merge_image_features

  def merge(x_btd, is_image_bt, feats):
    if feats.ndim == 3 and feats.shape[0] != x_btd.shape[0]:
      feats = feats.reshape(-1, feats.shape[-1])
    return per_row(x_btd, is_image_bt, feats)
  qwen_vl.merge_image_features = merge


def tower_flop_share(config_name: str, cand_len: int) -> float:
  """The vision tower's (and merger's) share of a released config's step FLOPs at `cand_len`,
  by `tools.aot_compile.model_flops`: the step without patches against the step with them."""
  import importlib

  from trace_jax.model import factory
  from trace_jax.tools.aot_compile import model_flops
  config = importlib.import_module(f"configs.{config_name}").get_config()
  config.data.cand_len = cand_len
  model_cfg = factory.model_config(config)
  full = model_flops(config, model_cfg)
  config.data.image_grid = (1, 0, 0)
  return 1.0 - model_flops(config, model_cfg) / full


def mixed(text_rows: float, rounds: int, steps: int):
  """A mixed batch whose first `text_rows` of queries have no image: the step as the pipeline
  feeds it (pixels for every row, blank for text rows: the tower runs on all B rows) against the
  tower over the image rows only, and against no tower at all (a floor: image rows then get no
  features). trace_jax only, one device."""
  import jax
  import numpy as np
  import transformers
  merge_image_rows_only()
  q, c, pixels = batch_arrays()
  n_img = int(np.prod(IMG_GRID)) // 4
  image_rows = np.arange(B) >= int(round(text_rows * B))
  q[~image_rows, 4:6 + n_img] = np.random.default_rng(1).integers(0, 3900, (
    int((~image_rows).sum()), n_img + 2))  # Text rows: text where the image was.
  pixels[~image_rows] = 0.0
  with tempfile.TemporaryDirectory() as hf_dir:
    transformers.Qwen2_5_VLForConditionalGeneration(hf_config()).save_pretrained(hf_dir)
    mesh, cfg, step_fn, st = jax_step(hf_dir, 1)
  batches = {"all_rows": jax_batch(cfg, q, c, pixels, mesh, image_rows),
             "image_rows": jax_batch(cfg, q, c, pixels[image_rows], mesh, image_rows),
             "no_tower": jax_batch(cfg, q, c, None, mesh, image_rows)}
  with jax.set_mesh(mesh):
    check = {}
    for name in ("all_rows", "image_rows"):  # One step from the same state: the same loss.
      _, m = step_fn(jax.tree.map(lambda x: x.copy(), st), batches[name])
      check[name] = float(m["loss/total"])
      print(f"{name}: compiled, loss {check[name]:.6f}", flush=True)
    times = {name: [] for name in batches}
    for name, batch in batches.items():  # Warm-up (compiles the last one).
      st, m = step_fn(st, batch)
    jax.block_until_ready(m)
    for r in range(rounds):
      for name in (list(batches) if r % 2 else list(batches)[::-1]):
        start = time.perf_counter()
        for _ in range(steps):
          st, m = step_fn(st, batches[name])
        jax.block_until_ready(m)
        times[name].append((time.perf_counter() - start) / steps)
        print(f"round {r} {name}: {1e3 * times[name][-1]:.1f} ms/step", flush=True)
  ms = {name: 1e3 * min(t) for name, t in times.items()}
  result = {"text_rows": float((~image_rows).mean()), "ms_per_step": ms,
            "loss_all_rows": check["all_rows"], "loss_image_rows": check["image_rows"],
            "image_rows_saving": 1 - ms["image_rows"] / ms["all_rows"],
            "tower_share": 1 - ms["no_tower"] / ms["all_rows"],
            "qwen2_5_vl_7b_tower_flop_share": {n: tower_flop_share("qwen2_5_vl_7b", n)
                                               for n in (256, 1280)}}
  print(f"device: {jax.devices()[0].device_kind}; {B} queries, "
        f"{int((~image_rows).sum())} without an image; best of {rounds} rounds of {steps}")
  print(f"ms/step: tower on all rows {ms['all_rows']:.1f}, on image rows only "
        f"{ms['image_rows']:.1f} (saves {100 * result['image_rows_saving']:.1f}%), no tower "
        f"{ms['no_tower']:.1f} (the tower's share {100 * result['tower_share']:.1f}%); loss "
        f"{check['all_rows']:.6f} vs {check['image_rows']:.6f}")
  print(json.dumps(result))


def main():
  trace_devices.huge_page_malloc()  # As `trace_jax.main` runs: XLA temp buffers in huge pages.
  args = dict(a.lstrip("-").split("=") for a in sys.argv[1:])
  rounds, steps = int(args.get("rounds", 3)), int(args.get("steps", 3))
  devices = int(args.get("devices", 1))
  if "text_rows" in args:
    return mixed(float(args["text_rows"]), rounds, steps)
  if devices > 1:
    trace_devices.split_cpu(devices)
  import torch
  torch.manual_seed(0)
  cfg = hf_config()
  q, c, pixels = batch_arrays()
  with tempfile.TemporaryDirectory() as hf_dir:
    import transformers
    transformers.Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(hf_dir)
    runners = {"jax": jax_runner(hf_dir, q, c, pixels, devices),
               "torch": torch_runner(hf_dir, q, c, pixels)}
    for run in runners.values():
      run()  # Warm-up (compiles).
    times = {k: 0.0 for k in runners}
    for _ in range(rounds):
      for name, run in runners.items():
        start = time.perf_counter()
        for _ in range(steps):
          run()
        times[name] += time.perf_counter() - start
  tokens = rounds * steps * B * (q.shape[1] + c.shape[1])
  flops = model_flops(cfg.text_config, q.shape[1], c.shape[1])
  peak = peak_flops()
  n_params = sum(p.numel() for p in transformers.Qwen2_5_VLForConditionalGeneration(cfg)
                 .parameters())
  result = {"tokens_per_s": tokens / times["jax"], "ref_tokens_per_s": tokens / times["torch"],
            "ratio": times["torch"] / times["jax"],
            "mfu": flops / (times["jax"] / (rounds * steps)) / peak}
  import jax
  print(f"device: {jax.devices()[0].device_kind}; torch: "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}")
  print(f"parameters {n_params / 1e6:.1f} M, model TFLOP/step {flops / 1e12:.3f}, "
        f"peak matmul {peak / 1e9:.1f} GFLOP/s")
  print(f"trace_jax {result['tokens_per_s']:.0f} tok/s, transformers "
        f"{result['ref_tokens_per_s']:.0f} tok/s, ratio {result['ratio']:.2f}, "
        f"MFU {100 * result['mfu']:.1f}%")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
