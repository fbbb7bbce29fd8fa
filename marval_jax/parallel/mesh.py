"""Device mesh from the config (axes data, fsdp, tensor) and guarded multi-host initialisation."""
from __future__ import annotations

import logging

import jax
import numpy as np

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
    n = num_devices or jax.device_count()
    sizes = [int(mesh_cfg.shape[a]) for a in AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n % known:
            raise ValueError(f"{n} devices do not divide into mesh {dict(zip(AXES, sizes))}")
        sizes[sizes.index(-1)] = n // known
    if int(np.prod(sizes)) != n:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, have {n}")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    """The axis type comes from the config: jax 0.10's make_mesh would default to Explicit."""
    devices = devices if devices is not None else jax.devices()
    kind = {"auto": jax.sharding.AxisType.Auto, "explicit": jax.sharding.AxisType.Explicit}.get(mesh_cfg.axis_types)
    if kind is None:
        raise ValueError(f"mesh.axis_types must be 'auto' or 'explicit', got {mesh_cfg.axis_types!r}")
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(kind,) * len(AXES), devices=devices)
