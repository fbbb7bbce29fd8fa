"""Load model parameters from either a params checkpoint (converted / exported, with model.json) or a run workdir
(latest checkpoint; EMA weights of the trained role). Both check the model config before reading arrays.

Paths go through etils.epath (local or gs://). A run workdir's arrays are restored straight into the layout of
`abstract_params` (each leaf's current sharding; unsharded leaves replicated over all devices), and only the role's
parameters are read (orbax partial restore): a checkpoint written under another mesh or process/device topology
(e.g. 1 process x 8 devices) loads on the current one, and optimizer states are never materialised.
"""
from __future__ import annotations

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from marval_jax.checkpoints import manager as ckpt
from marval_jax.checkpoints.params_io import current_sharding, load_params
from marval_jax.user_errors import UserError

# Where each run kind keeps the weights to sample with: state key path of the trained role's EMA.
ROLE_PATHS = {"mar": ("ema_params",), "distill": ("generator", "ema_params"), "rl": ("ema_params",)}
RAW_PATHS = {("ema_params",): ("params",), ("generator", "ema_params"): ("generator", "params")}


def _unwrap(node):
    """Saved nnx.State leaves come back as {"value": array}; strip that wrapper."""
    if isinstance(node, dict):
        if set(node) == {"value"} and not isinstance(node["value"], dict):
            return node["value"]
        return {k: _unwrap(v) for k, v in node.items()}
    return node


def _child(node: dict, key: str):
    if key in node:
        return node[key]
    if key.isdigit() and int(key) in node:
        return node[int(key)]
    raise KeyError(key)


def _restore_target(meta, want, where: str):
    """The saved tree's structure (`meta`: orbax metadata, leaves maybe wrapped as {"value": ...}) with each leaf a
    ShapeDtypeStruct of the current model leaf (`want`, a pure dict): shape checked, dtype and sharding current."""
    if isinstance(meta, dict) and set(meta) == {"value"} and not isinstance(meta["value"], dict):
        return {"value": _restore_target(meta["value"], want, where)}
    if isinstance(meta, dict):
        if not isinstance(want, dict):
            raise UserError(f"{where}: {sorted(meta)} in the checkpoint is a leaf in the model")
        missing = sorted(set(map(str, want)) - set(meta))
        if missing:
            raise UserError(f"{where}: the checkpoint lacks {missing[:5]}; is it a run of this model?")
        try:
            return {k: _restore_target(v, _child(want, k), f"{where}/{k}") for k, v in meta.items()}
        except KeyError as e:
            raise UserError(f"{where}: the checkpoint has {e.args[0]!r}, which the model does not") from None
    if isinstance(want, dict):
        raise UserError(f"{where}: a leaf in the checkpoint, {sorted(want)} in the model")
    shape = tuple(getattr(meta, "shape", ()) or ())
    if shape != tuple(want.shape):
        raise UserError(f"{where}: shape {shape} in the checkpoint, the model wants {tuple(want.shape)}")
    return jax.ShapeDtypeStruct(want.shape, want.dtype, sharding=current_sharding(want))


def _subtree(tree, keys):
    for k in keys:
        tree = tree.get(k) if isinstance(tree, dict) else None
    return tree


def _nest(keys, value):
    for k in reversed(keys):
        value = {k: value}
    return value


def load_model_params(path: str, abstract_params: nnx.State, model_config: dict, use_ema: bool = True) -> nnx.State:
    if not path:
        raise UserError("no checkpoint path given (set teacher_ckpt / student_ckpt / init_from)")
    root = epath.Path(path)
    if not root.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if (root / "model.json").exists():
        return load_params(path, abstract_params, model_config)
    if not (root / "checkpoints").is_dir():
        raise FileNotFoundError(f"{path} is neither a params checkpoint (model.json) nor a run workdir (checkpoints/)")
    manager = ckpt.make_manager(path, save_interval=1, keep=1000, async_save=False)
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"run workdir {path} has no checkpoint yet")
    saved_cfg = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    ckpt.check_config(saved_cfg, {"model": model_config}, where=f"{path} step {step}")
    state_dir = epath.Path(manager.directory) / str(step) / "state"
    with ocp.PyTreeCheckpointer() as reader:
        meta = reader.metadata(state_dir)
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
    keys = next((k for k in ROLE_PATHS.values() if _subtree(meta, k) is not None), None)
    if keys is None:
        top = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise UserError(f"{path} step {step}: no parameters found under {top}; expected a run workdir of "
                        f"kind {sorted(ROLE_PATHS)} or a params checkpoint (model.json)")
    if not use_ema:
        keys = RAW_PATHS[keys]
    target = _nest(keys, _restore_target(_subtree(meta, keys), nnx.to_pure_dict(abstract_params),
                                         f"{path} step {step}: {'/'.join(keys)}"))
    with ocp.PyTreeCheckpointer() as reader:
        raw = reader.restore(state_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    out = jax.tree_util.tree_map(lambda x: x, abstract_params)
    nnx.replace_by_pure_dict(out, _unwrap(_subtree(raw, keys)))
    return out
