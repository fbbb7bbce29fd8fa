"""The one factory for run checkpoints (orbax) and the preemption signal.

A run directory holds `checkpoints/<step>/{state, data, config}`: the train state as a pure-dict pytree, the
grain iterator state (so a resumed run sees exactly the batches it would have seen) and the config as JSON (so a
checkpoint from another model config is refused with a clear error instead of a shape failure deep in orbax).
Saves are asynchronous; every `save_interval` steps, on preemption (SIGTERM, or orbax's multi-host preemption
signal) and at the end. Runs always resume from the latest step in their workdir.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading

import grain
import orbax.checkpoint as ocp

_SIGTERM = threading.Event()


def install_sigterm_handler() -> None:
    """SIGTERM (preemption, `kill`) sets a flag the loop polls: it saves, waits for the save, and exits cleanly."""
    def handler(signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and exiting")
        _SIGTERM.set()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def preempted(manager: ocp.CheckpointManager, step: int) -> bool:
    return _SIGTERM.is_set() or manager.reached_preemption(step)


def make_manager(workdir: str, *, save_interval: int, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(save_interval_steps=max(int(save_interval), 1), max_to_keep=keep,
                                           enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir) if "://" not in workdir else workdir, "checkpoints"),
        options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})


def save(manager, step: int, state, data_iter, config_json: dict, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config_json)}
    if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return manager.save(step, args=ocp.args.Composite(**args), force=force)


class ConfigMismatchError(ValueError):
    pass


# Model fields that do not change the parameters: a checkpoint may be loaded under other values.
NON_ARCHITECTURAL = ("dtype", "remat", "attn_dropout", "proj_dropout", "label_drop_prob", "attention_impl")


def _model_defaults() -> dict:
    import dataclasses
    from marval_jax.models.mar import MARConfig
    return {f.name: f.default for f in dataclasses.fields(MARConfig)}


def check_config(saved: dict, current: dict, keys=("model",), where: str = "",
                 ignore=NON_ARCHITECTURAL) -> None:
    """Refuse a checkpoint whose model config differs from the run's (one message listing the differences).
    A field missing on one side counts as the MARConfig default (checkpoints written before it existed)."""
    diffs = []
    defaults = _model_defaults()
    for k in keys:
        a, b = saved.get(k), current.get(k)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                for f in sorted(set(a) | set(b)):
                    if f in ignore:
                        continue
                    if a.get(f, defaults.get(f)) != b.get(f, defaults.get(f)):
                        diffs.append(f"{k}.{f}: checkpoint {a.get(f)!r} vs config {b.get(f)!r}")
            else:
                diffs.append(f"{k}: checkpoint {a!r} vs config {b!r}")
    if diffs:
        raise ConfigMismatchError(f"checkpoint {where} was written by another config:\n  " + "\n  ".join(diffs))


def restore(manager, step: int, abstract_state, data_iter, current_config: dict):
    """Restore (state, config) of `step` into `abstract_state`'s structure; the data iterator in place."""
    saved_cfg = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    check_config(saved_cfg, current_config, where=f"{manager.directory}/{step}")
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
        out = manager.restore(step, args=ocp.args.Composite(**args))
    except ValueError as e:
        if "tree structures do not match" in str(e) or "shape" in str(e):
            raise ConfigMismatchError(
                f"checkpoint {manager.directory}/{step} does not fit this run's state (an optimizer or role setting "
                f"changed since it was written?): {str(e).splitlines()[0]}") from e
        raise
    return out["state"]


def read_config(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, "config", "metadata")) as f:
        return json.load(f)
