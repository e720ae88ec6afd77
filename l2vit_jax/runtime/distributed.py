"""Joining a multi-process run (TPU VM pod slices, multi-node GPU, two CPU processes in tests) before
anything else touches JAX's backends."""

from __future__ import annotations

import os

import jax

from l2vit_jax.runtime import peers

# Set (to 1) on every worker of a Cloud TPU VM slice (scripts/launch_tpu.py does): JAX then finds the
# coordinator, process count and id itself. JAX cannot tell a TPU VM from elsewhere without touching the
# backend, and the call fails outside a cluster, so it is opt-in (big_vision's BV_JAX_INIT pattern).
AUTO_DISTRIBUTED_VARIABLE = "L2VIT_DISTRIBUTED"


def initialize() -> None:
  """Multi-host (TPU VM pod slices, multi-node GPU) runs set these; single-host runs skip it.

  A process of a multi-process run that dies ends the others within ``L2VIT_PEER_TIMEOUT_SECONDS``
  (``runtime.peers``: one ``error: ... lost process N`` line), instead of leaving them in a collective.
  """
  timeouts = dict(heartbeat_timeout_seconds=peers.jax_heartbeat_timeout_seconds())
  if os.environ.get(AUTO_DISTRIBUTED_VARIABLE, "") not in ("", "0"):
    jax.distributed.initialize(**timeouts)
  elif os.environ.get("L2VIT_COORDINATOR_ADDRESS"):
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes (tests)
    jax.distributed.initialize(
      coordinator_address=os.environ["L2VIT_COORDINATOR_ADDRESS"],
      num_processes=int(os.environ["L2VIT_NUM_PROCESSES"]),
      process_id=int(os.environ["L2VIT_PROCESS_ID"]),
      **timeouts,
    )
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize(**timeouts)
  else:
    return
  peers.start_watchdog()
