"""A run directory as the rest of the project reads it: its config, its checkpoints (latest, best,
a given step), the parameters alone, or the whole train state.

Inference, export and evaluation restore parameters only: the AdamW moments (twice the size of
the model) are never read for them. Resuming a run restores the full state (``restore_state``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from train import config as C
from train.core import sharding
from train.core.checkpoint import Checkpointer
from train.core.step import compile_steps


def checkpoint_folder(run_dir: str | Path, best: bool = False) -> Path:
    """``RUN/checkpoints`` (the last N), or ``RUN/checkpoints/best`` (best by ``checkpoint.keep_best``)."""
    folder = Path(run_dir) / "checkpoints"
    return folder / "best" if best else folder


def load_config(run_dir: str | Path) -> C.Config:
    """The resolved config saved in ``RUN/config.yaml``."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (is it a run directory of python -m train?)")
    return C.load(path)


def _one_device_steps(cfg: C.Config, mesh=None):
    """The compiled steps of ``cfg`` on ``mesh`` (one device, batch 1 by default): the restore targets."""
    cfg = dataclasses.replace(cfg, mesh=C.MeshConfig(data=1, fsdp=1, tensor=1))
    if mesh is None:
        one = C.replace(cfg, train={"batch_size": 1, "per_device_batch_size": 1}, optimizer={"grad_accum_steps": 1})
        mesh = sharding.make_mesh(one, jax.devices()[:1])
    return compile_steps(cfg, mesh)


def _open(run_dir: str | Path, best: bool) -> Checkpointer:
    folder = checkpoint_folder(run_dir, best)
    ckpt = Checkpointer(folder, keep=10**6, async_save=False)
    if ckpt.latest_step() is None:
        ckpt.close()
        raise FileNotFoundError(f"{folder}: no checkpoint found")
    return ckpt


def restore_state(run_dir: str | Path, step: int | None = None, *, mesh=None, best: bool = False):
    """``(config, train state, loader states, meta)`` of a checkpoint of ``run_dir`` (latest
    unless ``step``), on one device by default: the full state, optimizer moments included (for
    continuing a run or growing its vocabulary)."""
    cfg = load_config(run_dir)
    compiled = _one_device_steps(cfg, mesh)
    ckpt = _open(run_dir, best)
    try:
        state, loader_states, meta = ckpt.restore(step, compiled.abstract_state)
    finally:
        ckpt.close()
    return cfg, state, loader_states, meta


def restore_params(run_dir: str | Path, step: int | None = None, *, mesh=None, best: bool = False):
    """``(config, parameters, step)`` of a checkpoint of ``run_dir`` (latest unless ``step``), on
    one device by default: what export, sampling and evaluation need. Only the parameters are read."""
    cfg = load_config(run_dir)
    compiled = _one_device_steps(cfg, mesh)
    ckpt = _open(run_dir, best)
    try:
        params, meta = ckpt.restore_params(step, compiled.abstract_state.params)
    finally:
        ckpt.close()
    return cfg, params, int(meta["step"])


def read_meta(run_dir: str | Path, step: int | None = None, *, best: bool = False) -> dict[str, Any]:
    """The JSON ``meta`` item of a checkpoint (step, config, eval results), no arrays read."""
    ckpt = _open(run_dir, best)
    try:
        return ckpt.restore_meta(step)
    finally:
        ckpt.close()
