"""The full TRACE train step in trace_jax against PyTorch + transformers, side by side.

    python -m benchmarks.train_step [--rounds=3] [--steps=3] [--devices=1]

Bench config (documented in docs/benchmarks.md): Qwen2.5-VL-shaped, decoder width 512, 8 layers,
8 heads / 2 KV heads, MLP 1536, vocab 4096; vision tower 2 blocks of width 256 (frozen on both
sides); batch 16 queries of 512 text tokens + one 16x16-patch image (64 image tokens) and 16 text
candidates of 64 tokens; LM loss on the last 64 query tokens, InfoNCE (tau 0.05) over the batch;
AdamW on the decoder, embeddings and merger. Both sides start from the same weights (one
`save_pretrained` directory) and see the same batch. The two are timed alternately for `--rounds`
rounds of `--steps` steps after a warm-up; the script also measures this machine's peak fp32
matmul FLOP/s with a large matrix product and reports model FLOPs utilisation. Last line: JSON
`{"tokens_per_s", "ref_tokens_per_s", "ratio", "mfu"}`.
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


def jax_runner(hf_dir, q, c, pixels, devices):
  import jax
  import numpy as np
  from ml_collections import ConfigDict

  from trace_jax import sharding
  from trace_jax.model.hf_io import load_hf
  from trace_jax.model.positions import rope_index, vision_layout
  from trace_jax.train import state as state_lib
  from trace_jax.data.batch import batch_shardings
  from trace_jax.train.step import StepConfig, make_train_step
  mesh = sharding.make_mesh(1, -1, 1, devices=jax.devices()[:devices])
  model, cfg = load_hf(hf_dir, dtype="float32", mesh=mesh)
  optim = ConfigDict(dict(lr=1e-4, warmup_steps=0, final_lr_fraction=1.0, weight_decay=0.01,
                          b1=0.9, b2=0.999, eps=1e-8, grad_clip=0.0))
  tx, schedule = state_lib.make_optimizer(optim, 100)
  graphdef, st = state_lib.init_state(model, tx, lora_rank=0, temperature=TAU,
                                      learn_temperature=False, mesh=mesh)
  emb = 4095  # The last query / candidate token plays <|emb|>: read the position before it.
  q, c = q.copy(), c.copy()
  q[:, -1], c[:, -1] = emb, emb
  target = np.zeros_like(q)
  target[:, -TARGETS:] = 1
  grid = np.tile(np.asarray([IMG_GRID]), (B, 1))
  layout = vision_layout(np.asarray([IMG_GRID]), cfg.vision, windowed=True)
  batch = {"query_ids": q, "query_mask": np.ones_like(q), "query_target_mask": target,
           "query_positions": rope_index(q, None, grid, cfg), "query_pixels": pixels,
           "query_layout": layout, "cand_ids": c, "cand_mask": np.ones_like(c),
           "cand_positions": rope_index(c, None, None, cfg)}
  step_fn = make_train_step(graphdef, StepConfig(emb_token_id=emb, temperature=TAU,
                                                 contrastive_impl="global", vocab_chunk=4096,
                                                 max_target_tokens=TARGETS),
                            tx, schedule, mesh, state_lib.shardings_of(st))
  batch = jax.tree.map(jax.device_put, batch, batch_shardings(batch, mesh))
  box = {"state": st}

  def step():
    with jax.set_mesh(mesh):
      box["state"], m = step_fn(box["state"], batch)
    jax.block_until_ready(m)
  return step


def main():
  trace_devices.huge_page_malloc()  # As `trace_jax.main` runs: XLA temp buffers in huge pages.
  args = dict(a.lstrip("-").split("=") for a in sys.argv[1:])
  rounds, steps = int(args.get("rounds", 3)), int(args.get("steps", 3))
  devices = int(args.get("devices", 1))
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
