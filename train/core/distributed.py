"""Multi-host start-up: ``jax.distributed.initialize`` from the config or the environment.

A single process needs nothing. With ``mesh.coordinator_address`` (or CODENEO_COORDINATOR /
CODENEO_NUM_PROCESSES / CODENEO_PROCESS_ID in the environment) the processes meet there; on
TPU VMs and under SLURM, JAX detects everything itself.
"""

from __future__ import annotations

import os
import socket
import time

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


def _use_cpu_collectives() -> None:
    """Cross-process collectives on CPU need gloo (the default CPU backend has none)."""
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if platforms.split(",")[0] in ("", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Poll ``host:port`` until it accepts a TCP connection; a ``ConfigError`` after ``timeout_s``.

    XLA aborts the whole process (no Python exception) when it cannot reach the coordinator, so
    processes other than 0 check first and fail with a readable one-line message instead."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"mesh.coordinator_address: expected host:port, got {address!r}")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"mesh.coordinator_address: {address} unreachable after {timeout_s:g} s "
                    f"({err.strerror or err}); is process 0 running there?"
                ) from None
            time.sleep(0.5)


def _join(timeout_s: int, **kwargs) -> None:
    where = kwargs.get("coordinator_address") or "the auto-detected coordinator"
    try:
        jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
    except Exception as err:  # XLA raises plain RuntimeError/XlaRuntimeError with a long status text
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"mesh.coordinator_address: could not join {where} within {timeout_s} s "
            f"(is process 0 running and the port reachable?): {first[:300]}"
        ) from err


def initialize(mesh: MeshConfig, timeout_s: int | None = None) -> None:
    """Join the multi-controller runtime when configured; a no-op for a single process.

    Bad input stops with a ``ConfigError`` naming the key: ``mesh.num_processes`` missing,
    ``mesh.process_id`` out of range (at once), ``mesh.coordinator_address`` unreachable (after
    ``mesh.init_timeout_s`` seconds, env CODENEO_INIT_TIMEOUT)."""
    global _initialized
    if _initialized:
        return
    if timeout_s is None:
        timeout_s = _env_int("CODENEO_INIT_TIMEOUT", mesh.init_timeout_s)
    address = mesh.coordinator_address or os.environ.get("CODENEO_COORDINATOR", "")
    num = mesh.num_processes or _env_int("CODENEO_NUM_PROCESSES", 0)
    pid = mesh.process_id if mesh.process_id >= 0 else _env_int("CODENEO_PROCESS_ID", -1)
    if address:
        if num <= 0:
            raise ConfigError("mesh.num_processes: needed with mesh.coordinator_address (how many processes?)")
        if not 0 <= pid < num:
            raise ConfigError(f"mesh.process_id: {pid} is out of range for {num} processes (0..{num - 1})")
        if num == 1:
            return  # one process: nothing to join
        if pid != 0:
            wait_for_coordinator(address, timeout_s)
        _use_cpu_collectives()
        _join(timeout_s, coordinator_address=address, num_processes=num, process_id=pid)
        _initialized = True
    elif detect_cluster():
        _join(timeout_s)
        _initialized = True
