"""Shardings from logical axes: each model file's LOGICAL_AXES (regex over parameter paths -> logical axes) and
the config's logical_axis_rules (logical axis -> mesh axes). Unmatched parameters are replicated; a logical axis
whose mesh size does not divide the dimension falls back to replication for that dimension."""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from marval_jax.tree_paths import path_str


def _rules(rules) -> dict[str, Any]:
    out = {}
    for logical, mesh_axes in rules:
        out[logical] = tuple(mesh_axes) if isinstance(mesh_axes, (list, tuple)) else mesh_axes
    return out


def logical_to_spec(logical: Sequence[str | None], shape, mesh, rules) -> P:
    rules = _rules(rules)
    spec, used = [], set()
    for dim, name in zip(shape, logical):
        axes = rules.get(name) if name else None
        axes_t = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        size = 1
        for a in axes_t:
            size *= mesh.shape[a]
        if not axes_t or dim % size or used & set(axes_t) or size == 1:
            spec.append(None)
        else:
            used |= set(axes_t)
            spec.append(axes if isinstance(axes, str) or len(axes_t) > 1 else axes_t[0])
    return P(*spec)


def param_specs(params, logical_axes, mesh, rules):
    """PartitionSpec per leaf of a params pytree (nnx.State or dict); paths like 'encoder_blocks/0/attn/qkv/kernel'."""
    compiled = [(re.compile(r"(^|/)" + pat + "$"), axes) for pat, axes in logical_axes]

    def spec(path, leaf):
        name = path_str(path)
        name = re.sub(r"/value$", "", name)
        for pat, axes in compiled:
            if pat.search(name) and len(axes) == len(leaf.shape):
                return logical_to_spec(axes, leaf.shape, mesh, rules)
        return P()
    return jax.tree_util.tree_map_with_path(spec, params)


def named(mesh, specs):
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh, rules, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dimension over the mesh axes the 'batch' rule names."""
    axes = _rules(rules).get("batch")
    return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
