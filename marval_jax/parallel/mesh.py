"""Device mesh from the config (axes data, fsdp, tensor) and guarded multi-host initialisation."""
from __future__ import annotations

import logging

import jax
import numpy as np

from marval_jax.user_errors import UserError

AXES = ("data", "fsdp", "tensor")


def maybe_initialize_distributed(mesh_cfg) -> None:
    """`jax.distributed.initialize()` behind the config switch; a no-op when already initialised or off."""
    if not mesh_cfg.distributed_init:
        return
    if jax.distributed.is_initialized():
        return
    logging.info("jax.distributed.initialize (timeout %ss)", mesh_cfg.distributed_timeout_s)
    jax.distributed.initialize(initialization_timeout=int(mesh_cfg.distributed_timeout_s))


def mesh_shape(mesh_cfg, num_devices: int | None = None) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes of `mesh.shape` on `num_devices` devices (-1: the devices the others leave)."""
    n = num_devices or jax.device_count()
    sizes = [int(mesh_cfg.shape[a]) for a in AXES]
    given = dict(zip(AXES, sizes))
    if sizes.count(-1) > 1:
        raise UserError(f"mesh.shape={given}: at most one mesh axis may be -1 (the rest of the {n} devices)")
    if any(s < 1 and s != -1 for s in sizes):
        raise UserError(f"mesh.shape={given}: every axis must be >= 1 or -1 (the rest of the {n} devices)")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n % known:
            raise UserError(f"mesh.shape={given}: {n} devices do not divide into the fixed axes (product {known})")
        sizes[sizes.index(-1)] = n // known
    if int(np.prod(sizes)) != n:
        raise UserError(f"mesh.shape={given} needs {int(np.prod(sizes))} devices, have {n}; set one axis to -1 "
                        f"to take the rest")
    return tuple(sizes)


def batch_axes(mesh_cfg) -> tuple[str, ...]:
    """The mesh axes the 'batch' logical axis maps to (mesh.logical_axis_rules), e.g. ("data", "fsdp")."""
    for logical, mesh_axes in mesh_cfg.logical_axis_rules:
        if logical == "batch":
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    return ()


def batch_devices(mesh_cfg, num_devices: int | None = None) -> int:
    """How many ways the batch is split: the product of the batch axes' sizes on `num_devices` devices."""
    sizes = dict(zip(AXES, mesh_shape(mesh_cfg, num_devices)))
    return int(np.prod([sizes[a] for a in batch_axes(mesh_cfg)] or [1]))


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    """The axis type comes from the config: jax 0.10's make_mesh would default to Explicit."""
    devices = devices if devices is not None else jax.devices()
    kind = {"auto": jax.sharding.AxisType.Auto, "explicit": jax.sharding.AxisType.Explicit}.get(mesh_cfg.axis_types)
    if kind is None:
        raise UserError(f"mesh.axis_types must be 'auto' or 'explicit', got {mesh_cfg.axis_types!r}")
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(kind,) * len(AXES), devices=devices)
