"""Paper ablation: LoRA rank and alpha of the decoder adapters (the paper's default: r=128,
alpha=256).

Meant for the released-model configs started from a checkpoint (`ckpt.init_from`); the demo config
trains from scratch with `lora.rank = 0`, where adapters on random weights say little.
"""

RANK_ALPHA = ((16, 32.0), (32, 64.0), (128, 256.0), (128, 512.0), (256, 512.0))


def get_sweep() -> list[dict]:
  return [{"name": f"r{r}_alpha{int(a)}", "lora.rank": r, "lora.alpha": a}
          for r, a in RANK_ALPHA]
