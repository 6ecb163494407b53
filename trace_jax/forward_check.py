"""One sharded forward pass of a config's model on a generated image+text batch.

What `trace_jax.main` runs until the training loop exists: it proves the model builds born
sharded on the configured mesh, that the parameter table passes the replication check and that the
jitted multimodal forward runs. It trains nothing and measures no quality.
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trace_jax import sharding
from trace_jax.model import factory, prepare_positions


def generated_batch(cfg, batch: int = 4, text_len: int = 24, grid=(1, 4, 4), seed: int = 0):
  """[B, T] ids where every row holds one image of `grid` patches between vision markers."""
  rng = np.random.default_rng(seed)
  n_img = int(np.prod(grid)) // cfg.vision.spatial_merge_size**2
  text = rng.integers(0, min(cfg.image_token_id, cfg.text.vocab_size), (batch, text_len))
  image = [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]
  ids = np.concatenate([text[:, :4], np.tile(image, (batch, 1)), text[:, 4:]], axis=1)
  pixels = rng.standard_normal((batch * int(np.prod(grid)), cfg.vision.patch_dim), np.float32)
  return ids.astype(np.int32), pixels, np.tile(np.asarray(grid), (batch, 1))


def run(config, workdir: str) -> dict:
  del workdir  # Outputs are written by the caller.
  mesh = factory.make_mesh(config)
  with sharding.use_rules(config.sharding_rules or sharding.DEFAULT_RULES):
    t0 = time.time()
    model = factory.create_model(config, mesh)
    sharding.log_param_table(model, config.max_replicated_fraction)
    cfg = model.cfg
    ids, pixels, grid = generated_batch(cfg)
    extra = prepare_positions(cfg, ids, None, grid)

    @nnx.jit
    def forward(model, ids, pixels, positions, layout):
      out = model(ids, pixel_values=pixels, position_ids=positions, vision_layout=layout)
      return out.logits, out.hidden_states

    with jax.set_mesh(mesh):
      batch_ids = sharding.put(ids, mesh, ("act_batch", "act_len"))
      logits, hidden = forward(model, batch_ids, jnp.asarray(pixels), extra["position_ids"],
                               extra["vision_layout"])
      logits = np.asarray(logits)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  summary = {
    "family": cfg.family, "parameters": n_params, "mesh": dict(mesh.shape),
    "logits_shape": list(logits.shape), "hidden_shape": list(hidden.shape),
    "logits_finite": bool(np.isfinite(logits).all()), "seconds": round(time.time() - t0, 2),
  }
  logging.info("forward pass: %s", summary)
  return summary
