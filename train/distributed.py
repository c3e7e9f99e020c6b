"""Multi-process start-up: `jax.distributed.initialize` from flags or the environment.

On TPU pods and SLURM/Kubernetes GPU clusters JAX finds the coordinator by
itself (`auto`); elsewhere give the coordinator address, the process count
and this process's id (flags or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID). On CPU the processes talk through gloo collectives.
"""

from __future__ import annotations

import os

import jax


def initialize(
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    auto: bool = False,
) -> None:
    """Joins the process group if one is configured; a single process does nothing."""
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    process_id = process_id if process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "0"))
    if auto:
        jax.distributed.initialize()
        return
    if num_processes <= 1:
        return
    if not coordinator_address:
        raise ValueError(f"num_processes={num_processes} needs a coordinator address (host:port)")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} is outside [0, {num_processes})")
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
