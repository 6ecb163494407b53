"""Mesh, logical-axis rules and every sharding API call of trace_jax.

One rules table maps the logical axis names carried by parameters and activations to the mesh axes
`("data", "fsdp", "tensor")`. All JAX sharding calls live here, so the API churn stays in one file.
This module does not build models or batches.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Weights first, then activations. A logical name maps to a mesh axis
# only where that axis divides the dimension; otherwise the dimension is replicated (logged once).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  ("layers", None),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("vocab", "tensor"),
  ("norm", None),
  ("vit_patch", None),
  ("vit_embed", "fsdp"),
  ("vit_mlp", "tensor"),
  ("lora_rank", "fsdp"),
  ("act_batch", ("data", "fsdp")),
  ("act_len", None),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_kv_heads", "tensor"),
  ("act_mlp", "tensor"),
  ("act_vocab", "tensor"),
  ("act_patches", None),
  ("retrieval_rows", ("data", "fsdp", "tensor")),
)

_rules: list[tuple[tuple[str, Any], ...]] = [DEFAULT_RULES]
_log = logging.getLogger(__name__)


@contextlib.contextmanager
def use_rules(rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
  """Makes `rules` (e.g. from `config.sharding_rules`) the active table inside the block."""
  _rules.append(tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules))
  try:
    yield
  finally:
    _rules.pop()


def current_rules() -> tuple[tuple[str, Any], ...]:
  return _rules[-1]


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
  """A `("data", "fsdp", "tensor")` mesh; one size may be -1 to take the remaining devices."""
  devices = jax.devices() if devices is None else devices
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into mesh {sizes}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"have {len(devices)}")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh=None, rules=None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec, dropping mesh axes that do not divide a dim."""
  rules = dict(current_rules() if rules is None else rules)
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  axis_sizes = dict(zip(mesh.axis_names, mesh.axis_sizes)) if mesh is not None else {}
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    if name is not None and name not in rules:
      raise KeyError(f"logical axis {name!r} has no sharding rule")
    target = rules.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a in axis_sizes and a not in used)
    if shape is not None and axes and shape[i] % math.prod(axis_sizes[a] for a in axes):
      axes = ()  # Not divisible: replicate this dimension.
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def variable_axes(v: nnx.Variable) -> tuple[str | None, ...]:
  axes = v.get_metadata().get("logical_axes")
  if axes is None:
    return (None,) * np.ndim(v.get_value())
  return tuple(axes)


def state_shardings(state: Any, mesh: jax.sharding.Mesh) -> Any:
  """A pytree of NamedShardings for an (abstract) nnx State, from each Variable's logical axes."""
  def one(v):
    spec = logical_to_spec(variable_axes(v), v.get_value().shape, mesh)
    return v.replace(NamedSharding(mesh, spec))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(make: Callable[[], nnx.Module], mesh: jax.sharding.Mesh | None) -> nnx.Module:
  """Builds `make()` with every parameter born sharded (eval_shape, then jit with out_shardings)."""
  if mesh is None:
    return make()
  abstract = nnx.eval_shape(make)
  graphdef, abs_state = nnx.split(abstract)
  shardings = state_shardings(abs_state, mesh)

  @jax.jit
  def init():
    return nnx.split(make())[1]

  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def put(x: Any, mesh: jax.sharding.Mesh, names: Sequence[str | None]) -> jax.Array:
  """Places one host array on the mesh with the spec of its logical names."""
  return jax.device_put(x, NamedSharding(mesh, logical_to_spec(names, np.shape(x), mesh)))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def param_table(model: nnx.Module) -> list[tuple[str, tuple[int, ...], str, int, bool]]:
  """Rows (path, shape, spec, bytes per device, fully replicated) for every parameter."""
  rows = []
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    x = v.get_value()
    sh = getattr(x, "sharding", None)
    local = sh.shard_shape(x.shape) if sh is not None else x.shape
    replicated_here = sh is None or sh.is_fully_replicated
    rows.append(("/".join(map(str, path)), tuple(x.shape), str(getattr(sh, "spec", "")),
                 int(np.prod(local)) * x.dtype.itemsize, replicated_here))
  return rows


def log_param_table(model: nnx.Module, max_replicated_fraction: float = 1.0) -> None:
  """Logs the parameter table; raises when too many parameter bytes are fully replicated."""
  rows = param_table(model)
  total = sum(r[3] for r in rows)
  replicated_bytes = sum(r[3] for r in rows if r[4])
  for path, shape, spec, nbytes, _ in rows:
    _log.info("%-60s %-24s %-36s %10d", path, shape, spec, nbytes)
  frac = replicated_bytes / max(total, 1)
  _log.info("parameters: %d bytes per device, %.1f%% replicated", total, 100 * frac)
  if frac > max_replicated_fraction:
    raise ValueError(f"{100 * frac:.1f}% of parameter bytes are replicated on every device "
                     f"(limit {100 * max_replicated_fraction:.1f}%): check the sharding rules")
