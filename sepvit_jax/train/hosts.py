"""The processes of a run: JAX's distributed runtime, from flags or the cluster's environment."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils


def _launched_by_cluster() -> bool:
    """True when launched by something JAX's cluster detection understands (multi-process)."""
    env = os.environ
    return bool(
        env.get("JAX_COORDINATOR_ADDRESS")
        or (env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1)
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )


def initialize(coordinator_address: str | None, num_processes: int | None, process_id) -> None:
    """jax.distributed.initialize from the flags, or from the environment of a cluster."""
    if coordinator_address or num_processes:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    elif _launched_by_cluster():
        jax.distributed.initialize()


def same_on_every_process(text: str) -> str:
    """Process 0's `text` (e.g. a run name made from the clock), on every process."""
    if jax.process_count() == 1:
        return text
    encoded = np.frombuffer(text.encode().ljust(256, b"\0")[:256], np.uint8)
    return bytes(multihost_utils.broadcast_one_to_all(encoded)).rstrip(b"\0").decode()


def is_main() -> bool:
    """Process 0 writes the run's files and prints its progress."""
    return jax.process_index() == 0
