"""Stress tests of sharded programs on 8 fake CPU devices, each in a child process set up by
`devices.split_cpu(8)` as `trace_jax.main` is. Both deadlocked with XLA:CPU's default thread pools
(one thread per device on a 2-core machine): the devices waited in collectives until XLA aborted
the process ("may be stuck", "Termination timeout"). The child's collective timeouts are shortened
so that a deadlock fails the test in under a minute (see `devices.split_cpu`)."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Lower than XLA's 20 s / 40 s; a healthy collective here takes milliseconds, even under load.
TIMEOUTS = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=10 "
            "--xla_cpu_collective_call_terminate_timeout_seconds=30")
SETUP = """
import json, sys
from trace_jax import devices
devices.split_cpu(8)  # The set-up under test, before JAX starts.
import jax
"""
# A scanned MLP with FSDP x tensor sharded weights (the all-gathers run inside the loop) and a
# psum that does not wait for it; 300 steps dispatched without waiting, so that more than 32
# programs are in flight per device (XLA's limit, beyond which each launch blocks a pool thread).
IN_FLIGHT = SETUP + """
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                     axis_types=(jax.sharding.AxisType.Auto,) * 3)
sh = lambda *spec: NamedSharding(mesh, P(*spec))
w_sh = {"up": sh(None, "fsdp", "tensor"), "gate": sh(None, "fsdp", "tensor"),
        "down": sh(None, "tensor", "fsdp")}
x_sh, m_sh = sh(("data", "fsdp"), None), sh(("data", "fsdp"), "tensor")


def loss_fn(w, x, mask):
  def layer(h, wl):
    return h + (jnp.tanh(h @ wl["up"]) * jax.nn.sigmoid(h @ wl["gate"])) @ wl["down"], None
  h, _ = jax.lax.scan(layer, x, w)
  count = jax.shard_map(lambda m: jax.lax.psum(jnp.sum(m), ("data", "fsdp", "tensor")),
                        mesh=mesh, in_specs=P(("data", "fsdp"), "tensor"), out_specs=P())(mask)
  return jnp.sum(h ** 2) / count


def step(w, x, mask):
  loss, g = jax.value_and_grad(loss_fn)(w, x, mask)
  return jax.tree.map(lambda a, b: a - 1e-3 * b, w, g), loss


step = jax.jit(step, in_shardings=(w_sh, x_sh, m_sh), out_shardings=(w_sh, sh()),
               donate_argnums=0)
rng = np.random.default_rng(0)
shapes = {"up": (4, 64, 128), "gate": (4, 64, 128), "down": (4, 128, 64)}
w = {k: jax.device_put(rng.normal(size=s).astype(np.float32) / 8, w_sh[k])
     for k, s in shapes.items()}
x = jax.device_put(rng.normal(size=(32, 64)).astype(np.float32), x_sh)
mask = jax.device_put(np.ones((32, 16), np.float32), m_sh)
losses = []
for _ in range(300):
  w, loss = step(w, x, mask)
  losses.append(loss)
print(json.dumps([float(losses[0]), float(losses[-1])]))
"""
# The project's train step with FSDP over all 8 devices (its layers scanned, their weights
# all-gathered inside the loop), built again after `jax.clear_caches` so that it comes back from
# the persistent compilation cache, as the test suite's modules reload their programs.
FROM_CACHE = SETUP + """
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
from tests.train import test_step
from trace_jax import sharding

losses = []
for _ in range(4):  # Compiled, then loaded from the cache three times.
  _, metrics = test_step.build(sharding.make_mesh(1, 8, 1))
  losses.append(float(metrics["loss/total"]))
  jax.clear_caches()
print(json.dumps(losses))
"""


def _run(code, *args):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PJRT_NPROC")}
  env.update(XLA_FLAGS=TIMEOUTS, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  stuck = [line for line in proc.stderr.splitlines() if "may be stuck" in line]
  assert proc.returncode == 0, "\n".join(stuck[:8]) or proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_many_steps_in_flight():
  first, last = _run(IN_FLIGHT)
  assert last < first


def test_program_loaded_from_compilation_cache(tmp_path):
  losses = _run(FROM_CACHE, str(tmp_path))
  assert losses == [losses[0]] * 4  # The reloaded program computes what the compiled one did.
