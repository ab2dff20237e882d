"""Multi-process start-up. Call before anything touches a device, and only for training runs:
AOT compilation for a TPU topology must not initialise jax.distributed at all."""

import os

import jax


def initialize(coordinator_address=None, num_processes=None, process_id=None):
  """Joins a multi-process run when one is configured; a no-op for a single process.

  Explicit arguments (or MEKI_COORDINATOR / MEKI_NUM_PROCESSES / MEKI_PROCESS_ID) start a local
  or custom cluster; on a Cloud TPU pod (TPU_WORKER_HOSTNAMES set by the TPU VM) jax finds the
  coordinator itself.
  """
  coordinator_address = coordinator_address or os.environ.get('MEKI_COORDINATOR')
  if coordinator_address:
    num_processes = int(num_processes or os.environ['MEKI_NUM_PROCESSES'])
    process_id = int(process_id if process_id is not None else os.environ['MEKI_PROCESS_ID'])
    if os.environ.get('JAX_PLATFORMS', '') == 'cpu':  # CPU collectives across processes
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif ',' in os.environ.get('TPU_WORKER_HOSTNAMES', ''):
    jax.distributed.initialize()
