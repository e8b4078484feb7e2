"""Checkpoints with orbax: train state + every host's loader state + the config, atomically.

Orbax writes each step into a temporary folder and renames it when complete, so a crash never
leaves a checkpoint that looks whole. Saves are asynchronous (training continues while the
arrays are written); every process writes its own array shards. Restoring takes target
shardings, so a checkpoint restores onto a different mesh (resharding).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` with the items this project saves."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        )
        # PyTreeCheckpointHandler (what StandardSave uses underneath) also restores a subtree.
        handlers = {"state": ocp.PyTreeCheckpointHandler(), "loader": ocp.JsonCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """Every complete checkpoint's step, oldest first."""
        return sorted(self.manager.all_steps())

    def set_aside(self, step: int, folder: Path) -> Path:
        """Move checkpoint ``step`` (one that cannot be restored) into ``folder``: kept for a
        post-mortem, out of the way of the step being saved again. Process 0 moves it."""
        target = Path(folder) / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.directory / str(step), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"codeneo set aside checkpoint {step}")
        self.manager.reload()
        return target

    def save(self, step: int, state, loader_states: dict[str, Any], meta: dict[str, Any], *, force: bool = False):
        """Save ``state`` (a pytree of global jax.Arrays), the JSON loader states of all hosts,
        and ``meta`` (config, metrics) as checkpoint ``step``."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                loader=ocp.args.JsonSave(loader_states),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )

    def restore(self, step: int | None, target_state) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """Restore checkpoint ``step`` (latest if None) into the shapes/dtypes/shardings of
        ``target_state`` (a pytree of arrays or ``jax.ShapeDtypeStruct`` with shardings)."""
        step = self._step(step)
        abstract = jax.tree_util.tree_map(_abstract, target_state)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=_restore_args(abstract), loader=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
            ),
        )
        return out["state"], out["loader"], out["meta"]

    def restore_params(self, step: int | None, target_params) -> tuple[Any, dict[str, Any]]:
        """``(params, meta)`` of checkpoint ``step`` (latest if None): only the parameters are
        read (a partial restore), never the optimizer moments."""
        step = self._step(step)
        abstract = {"params": jax.tree_util.tree_map(_abstract, target_params)}
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=_restore_args(abstract, partial=True), meta=ocp.args.JsonRestore()),
        )
        return out["state"]["params"], out["meta"]

    def restore_meta(self, step: int | None) -> dict[str, Any]:
        """The JSON ``meta`` item of checkpoint ``step`` (latest if None)."""
        return self.manager.restore(self._step(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        return step

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _restore_args(abstract, partial: bool = False):
    """Restore arguments for a pytree of ``ShapeDtypeStruct`` targets (dtype and sharding per leaf)."""
    return ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                  partial_restore=partial)


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def gather_host_states(local_state: dict[str, Any]) -> dict[str, Any]:
    """Every process's loader state, keyed by process index, on every process.

    Loader states are small JSON; they travel as padded uint8 arrays through one
    ``process_allgather``, so process 0 can save them all in one JSON item."""
    if jax.process_count() == 1:
        return {"0": local_state}
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(local_state).encode(), dtype=np.uint8)
    lengths = multihost_utils.process_allgather(np.array([data.size], np.int32))
    size = int(np.max(lengths))
    padded = np.zeros(size, np.uint8)
    padded[: data.size] = data
    everything = multihost_utils.process_allgather(padded)
    return {
        str(i): json.loads(bytes(everything[i][: int(lengths[i][0])]).decode())
        for i in range(jax.process_count())
    }
