"""Params-only checkpoints (converted reference weights, exported EMA weights, the embedded default models).

A directory with `params/` (orbax, a pure-dict pytree) and `model.json` (the MARConfig fields it was built with).
Loading checks the model config first, so a checkpoint of another architecture gives one clear error.
"""
from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from marval_jax.checkpoints.manager import check_config


def save_params(directory: str, params: nnx.State, model_config: dict, extra: dict | None = None) -> str:
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, "params"), nnx.to_pure_dict(params), force=True)
    with open(os.path.join(directory, "model.json"), "w") as f:
        json.dump({"model": model_config, **(extra or {})}, f, indent=1, sort_keys=True)
    return directory


def read_model_config(directory: str) -> dict:
    path = os.path.join(directory, "model.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} is not a params checkpoint (no model.json); convert one with "
                                f"python -m marval_jax.tools.convert_mar or export one from a run")
    with open(path) as f:
        return json.load(f)["model"]


def load_params(directory: str, abstract_params: nnx.State, model_config: dict) -> nnx.State:
    """Params of `directory` as an nnx.State shaped like `abstract_params` (checked against `model_config`)."""
    directory = os.path.abspath(directory)
    check_config({"model": read_model_config(directory)}, {"model": model_config},
                 where=f"(params) {directory}")
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(abstract_params))
    with ocp.StandardCheckpointer() as ckptr:
        pure = ckptr.restore(os.path.join(directory, "params"), target)
    out = jax.tree_util.tree_map(lambda x: x, abstract_params)
    nnx.replace_by_pure_dict(out, pure)
    return out
