"""Per-device temporary memory of the three InfoNCE implementations as the global batch grows.

    python -m benchmarks.contrastive_memory [--dim=128] [--chunk=256]

Compiles value-and-gradient of `infonce_global`, `infonce_shard_map` and `infonce_chunked` on a
mesh of 8 fake CPU devices (data=2, fsdp=4) for global batches 256 .. 8192 and prints XLA's
compiled temporary bytes per device; the chunked one should grow linearly with the batch, the
others quadratically. Last line: one JSON object. Memory analysis only; nothing runs.
"""

from __future__ import annotations

import json
import sys

from trace_jax import devices


def main():
  args = dict(a.lstrip("-").split("=") for a in sys.argv[1:])
  dim, chunk = int(args.get("dim", 128)), int(args.get("chunk", 256))
  devices.split_cpu(8)
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from trace_jax import sharding
  from trace_jax.train import losses
  mesh = sharding.make_mesh(2, 4, 1)
  impls = {
    "global": lambda q, c: losses.infonce_global(q, c, 20.0)[0],
    "shard_map": lambda q, c: losses.infonce_shard_map(q, c, 20.0, mesh=mesh)[0],
    "chunked": lambda q, c: losses.infonce_chunked(q, c, 20.0, mesh=mesh, chunk=chunk)[0],
  }
  rows = []
  spec = NamedSharding(mesh, P(("data", "fsdp"), None))
  for batch in (256, 512, 1024, 2048, 4096, 8192):
    x = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=spec)
    row = {"global_batch": batch}
    for name, fn in impls.items():
      with jax.set_mesh(mesh):
        compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(x, x).compile()
      row[name] = compiled.memory_analysis().temp_size_in_bytes
    rows.append(row)
    print(f"batch {batch:5d}: " + "  ".join(f"{k} {row[k] / 2**20:8.1f} MiB" for k in impls),
          flush=True)
  print(json.dumps({"dim": dim, "chunk": chunk, "devices": 8, "temp_bytes": rows}))


if __name__ == "__main__":
  main()
