"""The command-line flags that join a run of several processes, shared by every entry point
(`trace_jax.main`, `trace_jax.eval`, `trace_jax.tools.teach`): `--num_processes`, `--process_id`
and `--coordinator_address`, with `TRACE_*` environment defaults for launch scripts. Defining
them here keeps the entry points' flags the same; joining is `devices.init_distributed`.
"""

import os

from absl import flags

from trace_jax import devices

COORDINATOR = flags.DEFINE_string("coordinator_address",
                                  os.environ.get("TRACE_COORDINATOR", "127.0.0.1:12355"),
                                  "host:port of process 0 (runs of several processes).")
NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", int(os.environ.get("TRACE_NUM_PROCESSES", "1")),
  "Processes in the run: 1, N (with --process_id), or -1 to let JAX detect them (TPU pods).")
PROCESS_ID = flags.DEFINE_integer("process_id", int(os.environ.get("TRACE_PROCESS_ID", "0")),
                                  "This process's index.")


def join() -> None:
  """Joins the run the flags describe (nothing for one process). Call after XLA_FLAGS is set
  and before JAX initialises its backend."""
  devices.init_distributed(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
