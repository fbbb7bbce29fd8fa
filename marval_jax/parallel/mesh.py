"""Device mesh from the config (axes data, fsdp, tensor) and guarded multi-host initialisation."""
from __future__ import annotations

import logging

import jax
import numpy as np

from marval_jax.user_errors import UserError

AXES = ("data", "fsdp", "tensor")


def _get(mesh_cfg, key: str, default):
    value = mesh_cfg.get(key, default) if hasattr(mesh_cfg, "get") else getattr(mesh_cfg, key, default)
    return default if value is None else value


def distributed_args(mesh_cfg) -> dict | None:
    """Keyword arguments of `jax.distributed.initialize` from `mesh.*`, or None when the run is one process.

    `mesh.coordinator_address` / `mesh.num_processes` / `mesh.process_id` (launch/run_local.sh --processes=N sets
    them) name the process group explicitly; left empty / -1 with `mesh.distributed_init=True`, JAX detects it from
    the environment (TPU VMs, SLURM, ...)."""
    address = str(_get(mesh_cfg, "coordinator_address", "") or "")
    num = int(_get(mesh_cfg, "num_processes", -1))
    pid = int(_get(mesh_cfg, "process_id", -1))
    explicit = bool(address) or num > 0 or pid >= 0
    if not (_get(mesh_cfg, "distributed_init", False) or explicit):
        return None
    if explicit and not (address and num > 0 and 0 <= pid < num):
        raise UserError(f"mesh.coordinator_address={address!r}, mesh.num_processes={num}, mesh.process_id={pid}: "
                        f"set all three (host:port, N >= 1, 0 <= id < N) or none (JAX's own detection)")
    args = {"initialization_timeout": int(_get(mesh_cfg, "distributed_timeout_s", 300))}
    if explicit:
        args.update(coordinator_address=address, num_processes=num, process_id=pid)
    return args


def maybe_initialize_distributed(mesh_cfg) -> None:
    """`jax.distributed.initialize(...)` behind the config switch; a no-op when already initialised or off.

    Must run before anything starts JAX's backend (a device count, an array): `marval_jax.main.run` calls it first,
    for every mode. CPU processes exchange their collectives through gloo (JAX's CPU default has none across
    processes); the setting only concerns the CPU client, so it is harmless on TPU / GPU hosts."""
    args = distributed_args(mesh_cfg)
    if args is None or jax.distributed.is_initialized():
        return
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logging.info("jax.distributed.initialize(%s)", args)
    jax.distributed.initialize(**args)


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
