"""All sharding decisions in one place: the device mesh and the logical-axis rules.

The model names logical axes only (see ``train/model.py``); ``LOGICAL_RULES`` maps each to mesh
axes. Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with parameters and
optimizer state sharded, ZeRO-3 style), ``tensor`` (heads / MLP / vocabulary split, Megatron
style). Changing a parallelism strategy means editing this table, not the model.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from train.config import Config, validate_for_devices

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
)

BATCH_AXES = ("data", "fsdp")


def make_mesh(cfg: Config, devices: list | None = None) -> Mesh:
    """A ``data x fsdp x tensor`` mesh over ``devices`` (default: all devices of all hosts).

    ``create_device_mesh`` orders devices so that the innermost axes (tensor, then fsdp) sit on
    the fastest interconnect (within a host / ICI ring)."""
    devices = list(jax.devices()) if devices is None else list(devices)
    shape = validate_for_devices(cfg, len(devices))
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, AssertionError, NotImplementedError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_to_sharding(logical_tree, mesh: Mesh):
    """NamedShardings for a tree of logical PartitionSpecs (from ``nn.get_partition_spec``)."""
    return nn.logical_to_mesh_sharding(logical_tree, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches ``[batch, seq]``: rows split over the data-parallel axes, replicated on tensor."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(host_batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """One global ``jax.Array`` from this host's rows (hosts contribute in process order)."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), host_batch)


def rules_context():
    """Context that lets ``nn.with_logical_constraint`` in the model resolve logical names."""
    return nn.logical_axis_rules(LOGICAL_RULES)
