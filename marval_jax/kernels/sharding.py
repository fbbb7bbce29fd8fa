"""Splitting a Pallas kernel call over the devices of the mesh in context.

Why: a `pallas_call` has no SPMD partitioning rule. Inside a jitted program whose operands are sharded over a mesh,
XLA's partitioner cannot split the call, so it gathers the operands onto every device and runs the whole kernel
there (or fails). The kernels of this package therefore run their call inside `jax.shard_map` over the mesh that
the caller put in context with `jax.set_mesh(mesh)` (train/loop.py traces the training step under it): each device
computes its own slice, the batch over the data-parallel axes ("data", "fsdp"), heads or output columns over
"tensor". This module holds the one rule for which mesh axes a dimension is split over, and the shard_map call;
the kernels decide which dimensions they split.

The rule (`split_axes`): the candidate axes are taken in order, each one present in the mesh, not already manual
(inside a caller's shard_map its axes are this device's slice already) and of size > 1, as long as the product of
the taken sizes still divides the dimension; an axis that would break divisibility is skipped (its devices hold
the same slice, replicated). E.g. B=8 on data=2, fsdp=2 splits over both; B=2 splits over "data" alone. Mesh axes
a call does not use are left out of its specs: its operands are replicated over them.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
from jax.sharding import AxisType, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")   # the axes the 'batch' logical axis maps to (configs/common.mesh_config)
TENSOR_AXES = ("tensor",)       # the axis that splits heads / MLP columns


def _free_axes(mesh) -> tuple[str, ...]:
    return tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual)


def context_mesh():
    """The abstract mesh of `jax.set_mesh` when a call can be split over it: more than one device along axes not
    already manual. None otherwise (no mesh in context, one device, or inside a shard_map over every axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape[a] for a in _free_axes(mesh)) <= 1:
        return None
    return mesh


def split_axes(mesh, size: int, candidates: Sequence[str]) -> tuple[str, ...]:
    """The axes among `candidates` that a dimension of `size` is split over (module docstring); () if mesh is None."""
    if mesh is None:
        return ()
    free, taken, product = _free_axes(mesh), [], 1
    for axis in candidates:
        n = mesh.shape.get(axis, 1) if axis in free else 1
        if n > 1 and size % (product * n) == 0:
            taken.append(axis)
            product *= n
    return tuple(taken)


def axes_size(mesh, axes: Sequence[str]) -> int:
    return math.prod(mesh.shape[a] for a in axes) if axes else 1


def entry(axes: Sequence[str]):
    """A PartitionSpec entry for a dimension split over `axes`: None, one axis name, or a tuple of them."""
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def shard_call(fn: Callable, mesh, in_specs: Sequence[P], out_specs, *args):
    """fn(*args) inside jax.shard_map over `mesh`'s non-manual axes, each operand split as its spec says.

    check_vma=False: a pallas_call's output has no varying-across-mesh-axes type (jax 0.10 asks for one on
    ShapeDtypeStruct with check_vma=True); every output here is split exactly as its spec says, replicated over
    the axes the spec leaves out. Explicit axes need the operands already laid out as the specs say (shard_map
    refuses a mismatch, it does not reshard), hence the jax.reshard first; Auto axes are resharded by XLA."""
    if mesh.explicit_axes:
        args = tuple(jax.reshard(a, s) for a, s in zip(args, in_specs))
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs,
                         axis_names=set(_free_axes(mesh)), check_vma=False)(*args)
