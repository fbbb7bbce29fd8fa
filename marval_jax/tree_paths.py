"""Flat "a/b/0/c" views of nnx.State / nested dict pytrees, used by converters and sharding rules."""
from __future__ import annotations

from typing import Any, Mapping

import jax
from flax import nnx


def _key_str(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path) -> str:
    return "/".join(_key_str(k) for k in path)


def flatten_state(tree: Any) -> dict[str, Any]:
    """{path string: leaf} for an nnx.State or any pytree (Variable wrappers unwrapped)."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): v for p, v in leaves}


def unflatten_into_state(state: nnx.State, flat: Mapping[str, Any]) -> nnx.State:
    """A copy of `state` whose leaves are replaced by `flat[path]`."""
    pure = nnx.to_pure_dict(state)
    new = jax.tree_util.tree_map_with_path(lambda p, v: flat[path_str(p)], pure)
    out = jax.tree_util.tree_map(lambda x: x, state)
    nnx.replace_by_pure_dict(out, new)
    return out
