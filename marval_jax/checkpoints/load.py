"""Load model parameters from either a params checkpoint (converted / exported, with model.json) or a run workdir
(latest checkpoint; EMA weights of the trained role). Both check the model config before reading arrays."""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from marval_jax.checkpoints import manager as ckpt
from marval_jax.checkpoints.params_io import load_params
from marval_jax.user_errors import UserError

# Where each run kind keeps the weights to sample with: state key path of the trained role's EMA.
ROLE_PATHS = {"mar": ("ema_params",), "distill": ("generator", "ema_params"), "rl": ("ema_params",)}


def _unwrap(node):
    """Saved nnx.State leaves come back as {"value": array}; strip that wrapper."""
    if isinstance(node, dict):
        if set(node) == {"value"} and not isinstance(node["value"], dict):
            return node["value"]
        return {k: _unwrap(v) for k, v in node.items()}
    return node


def load_model_params(path: str, abstract_params: nnx.State, model_config: dict, use_ema: bool = True) -> nnx.State:
    if not path:
        raise UserError("no checkpoint path given (set teacher_ckpt / student_ckpt / init_from)")
    if not os.path.exists(path) and "://" not in path:
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if os.path.exists(os.path.join(path, "model.json")):
        return load_params(path, abstract_params, model_config)
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        raise FileNotFoundError(f"{path} is neither a params checkpoint (model.json) nor a run workdir (checkpoints/)")
    manager = ckpt.make_manager(path, save_interval=1, keep=1000, async_save=False)
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"run workdir {path} has no checkpoint yet")
    saved_cfg = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    ckpt.check_config(saved_cfg, {"model": model_config}, where=f"{path} step {step}")
    raw = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    for keys in ROLE_PATHS.values():
        node = raw
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if node is not None:
            break
    if node is None:
        raise UserError(f"{path} step {step}: no parameters found under {list(raw)}; expected a run workdir of "
                        f"kind {sorted(ROLE_PATHS)} or a params checkpoint (model.json)")
    if not use_ema:
        node = raw.get("params") or raw["generator"]["params"]
    out = jax.tree_util.tree_map(lambda x: x, abstract_params)
    nnx.replace_by_pure_dict(out, jax.tree_util.tree_map(jax.numpy.asarray, _unwrap(node)))
    return out
