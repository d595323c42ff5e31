"""Multi-process startup: jax.distributed from flags or the environment, before any JAX work."""

import jax
from absl import flags, logging

_COORDINATOR = flags.DEFINE_string("coordinator", None,
                                   "host:port of process 0 (multi-process runs without a scheduler).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def initialize():
  """Explicit flags win; a single process (no flags) needs nothing."""
  if _COORDINATOR.value is None:
    return
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                             num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
