"""Orbax checkpoints of the train state together with the Grain data iterator.

One `CheckpointManager` under `WORKDIR/checkpoints` saves asynchronously every `ckpt.every_steps`
steps (and whenever asked), keeps the newest `ckpt.keep`, and restores onto the current mesh from
an abstract state that carries the target shardings. Orbax writes each step to a temporary folder
and renames it when complete, so a crash during a save leaves the previous checkpoint usable.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, *, every_steps: int,
         final: bool = False) -> bool:
  """Starts an async save at multiples of `every_steps` and at the final step."""
  if not final and step % every_steps:
    return False
  return mngr.save(step, args=ocp.args.Composite(
    state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)),
    force=True)


def restore_latest(mngr: ocp.CheckpointManager, state, data_iter):
  """(state, step) from the newest checkpoint, or (state, None) when there is none. `state` gives
  the structure and shardings; `data_iter` is advanced in place to the saved position."""
  step = mngr.latest_step()
  if step is None:
    return state, None
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = mngr.restore(step, args=ocp.args.Composite(
    state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(data_iter)))
  return restored["state"], step


def restore_state(workdir: str, state):
  """(state, step) of the newest checkpoint under WORKDIR (the data iterator is not needed)."""
  mngr = manager(workdir, keep=1)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {os.path.join(workdir, 'checkpoints')}")
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  mngr.close()
  return restored["state"], step
