"""Multi-host start-up: ``jax.distributed.initialize`` from the config or the environment.

A single process needs nothing. With ``mesh.coordinator_address`` (or CODENEO_COORDINATOR /
CODENEO_NUM_PROCESSES / CODENEO_PROCESS_ID in the environment) the processes meet there; on
TPU VMs and under SLURM, JAX detects everything itself.
"""

from __future__ import annotations

import os

import jax

from train.config import ConfigError, MeshConfig

_initialized = False


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError as err:
        raise ConfigError(f"{name}: expected an integer, got {value!r}") from err


def detect_cluster() -> str | None:
    """"tpu" on a multi-host TPU VM slice, "slurm" inside a multi-task SLURM job, else None."""
    if os.environ.get("TPU_WORKER_HOSTNAMES") and "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "tpu"
    if _env_int("SLURM_NTASKS", 1) > 1 and os.environ.get("SLURM_JOB_ID"):
        return "slurm"
    return None


def initialize(mesh: MeshConfig, timeout_s: int = 120) -> None:
    """Join the multi-controller runtime when configured; a no-op for a single process."""
    global _initialized
    if _initialized:
        return
    address = mesh.coordinator_address or os.environ.get("CODENEO_COORDINATOR", "")
    num = mesh.num_processes or _env_int("CODENEO_NUM_PROCESSES", 0)
    pid = mesh.process_id if mesh.process_id >= 0 else _env_int("CODENEO_PROCESS_ID", -1)
    if address:
        if num <= 0:
            raise ConfigError("mesh.num_processes: needed with mesh.coordinator_address (how many processes?)")
        if not 0 <= pid < num:
            raise ConfigError(f"mesh.process_id: {pid} is out of range for {num} processes (0..{num - 1})")
        jax.distributed.initialize(address, num_processes=num, process_id=pid,
                                   initialization_timeout=timeout_s)
        _initialized = True
    elif detect_cluster():
        jax.distributed.initialize(initialization_timeout=timeout_s)
        _initialized = True
