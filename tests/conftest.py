"""Test harness: 8 fake CPU devices, mesh fixtures, float32 matmuls, a per-process
compilation cache."""

import atexit
import gc
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")
from trace_jax import devices  # noqa: E402
devices.split_cpu(8)  # Keeps the 8 above; two pool threads per device, or collectives deadlock.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

from trace_jax import sharding  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# A compilation cache for this process only: modules recompile programs after
# `_release_executables`, and the cache serves them again. (Programs loaded from the cache used
# to deadlock in their collectives; `devices.split_cpu` gives XLA:CPU the pool threads they need,
# tests/test_cpu_collectives.py. A per-process cache keeps runs independent all the same.)
_CACHE_DIR = tempfile.mkdtemp(prefix="trace_jax_test_jit_cache_")
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def mesh():
  """The (data=2, fsdp=2, tensor=2) mesh over the 8 fake devices."""
  assert jax.device_count() == 8, "tests need 8 fake CPU devices"
  return sharding.make_mesh(2, 2, 2)


@pytest.fixture(scope="session")
def mesh_factory():
  """Builds other mesh shapes over the same 8 devices, e.g. mesh_factory(1, 4, 2)."""
  return sharding.make_mesh


@pytest.fixture(scope="module", autouse=True)
def _release_executables():
  """Drops the compiled programs when each test module ends (the process's cache keeps them).

  Each XLA:CPU executable holds its JIT-compiled code in memory mappings while it is cached; the
  whole suite in one process compiles enough programs to pass the kernel's limit on mappings
  (`vm.max_map_count`, 65530 by default: 1,000-4,000 more per model test module), after which
  LLVM fails with "Cannot allocate memory" and the process crashes.
  """
  yield
  jax.clear_caches()
  gc.collect()
