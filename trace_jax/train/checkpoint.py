"""Orbax checkpoints of the train state together with the Grain data iterator.

One `CheckpointManager` under `WORKDIR/checkpoints` saves asynchronously every `ckpt.every_steps`
steps (and whenever asked), keeps the newest `ckpt.keep`, and restores onto the current mesh from
an abstract state that carries the target shardings. Orbax writes each step to a temporary folder
and renames it when complete, so a crash during a save leaves the previous checkpoint usable.
Inference reads the weights alone (`restore_params`, no optimizer state) and names a saved step
by a fingerprint of its files (`fingerprint`), so caches built from it notice a retrain.
"""

from __future__ import annotations

import hashlib
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


def restore_params(workdir: str, target):
  """(the subtrees of the newest checkpoint's train state that `target` names, step): an Orbax
  partial restore, so the optimizer state (and anything else `target` leaves out) is never
  read. `target`: {"params": {"model": ...}, "frozen": ...} of ShapeDtypeStructs carrying the
  dtype and sharding each leaf is restored to."""
  mngr = manager(workdir, keep=1)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {os.path.join(workdir, 'checkpoints')}")
  restore_args = jax.tree.map(
    lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype, global_shape=x.shape),
    target)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
    item=target, restore_args=restore_args, partial_restore=True)))
  mngr.close()
  return restored["state"], step


# Small files Orbax writes into every step it saves: the step's metadata (with the save's start
# and commit times in nanoseconds) and the state's tree metadata and OCDBT manifest.
FINGERPRINT_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt")


def fingerprint(workdir: str, step: int) -> str:
  """A hash naming one save of a step (hex): the bytes of the small files Orbax writes with it
  (`FINGERPRINT_FILES`, those present). A retrain that saves the same step again changes it (the
  commit time, at least); copying the checkpoint elsewhere does not."""
  step_dir = os.path.join(os.path.abspath(workdir), "checkpoints", str(step))
  digest = hashlib.sha256()
  found = 0
  for name in FINGERPRINT_FILES:
    path = os.path.join(step_dir, name)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        digest.update(name.encode() + b"\0" + f.read() + b"\0")
      found += 1
  if not found:
    raise FileNotFoundError(f"{step_dir} has none of {FINGERPRINT_FILES}: not an Orbax step")
  return digest.hexdigest()
