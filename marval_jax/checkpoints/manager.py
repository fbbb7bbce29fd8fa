"""The one factory for run checkpoints (orbax) and the preemption signal.

A run directory holds `checkpoints/<step>/{state, data, config}`: the train state as a pure-dict pytree, the
grain iterator state (so a resumed run sees exactly the batches it would have seen) and the config as JSON (so a
checkpoint from another model config, or another global batch, is refused with a clear error instead of a shape
failure deep in orbax). Saves are asynchronous; every `save_interval` steps, on preemption (SIGTERM, or orbax's
multi-host preemption signal) and at the end.

Runs resume from the newest intact step (`restore_run`): a step that cannot be read (a truncated or zero-byte
manifest.ocdbt, a missing file) is named in a warning and the next older one is tried; `train.restore_step=N`
picks a step. Steps newer than the one restored are moved to `<workdir>/checkpoints_set_aside/<step>` (kept for
inspection, out of the manager's way: it would refuse to save a step that exists).
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time

import grain
import orbax.checkpoint as ocp
from etils import epath

from marval_jax.user_errors import UserError

_SIGTERM = threading.Event()


def preemption_service_running() -> bool:
    """JAX's preemption service is up: `jax.distributed.initialize` ran with `jax_enable_preemption_service`. Its
    own SIGTERM handler (installed in C++, invisible to Python's `signal.getsignal`) tells every process, and
    `reached_preemption_sync_point(step)` turns True at the same step on all of them."""
    from jax._src import distributed  # pylint: disable=import-outside-toplevel
    state = distributed.global_state
    return state.client is not None and getattr(state, "preemption_sync_manager", None) is not None


def install_sigterm_handler() -> None:
    """SIGTERM (preemption, `kill`) sets a flag the loop polls: it saves, waits for the save, and exits cleanly.

    Where JAX's preemption service runs (a multi-process run) nothing is installed: a Python handler would replace
    the service's, and then only the process that got the signal would know. Its SIGTERM reaches every process
    through the coordination service and `preempted` reads the agreed step. Elsewhere ours chains to a previous
    Python handler."""
    if preemption_service_running():
        logging.info("SIGTERM is left to JAX's preemption service (all processes stop at the same step)")
        return
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and exiting")
        _SIGTERM.set()
        if callable(previous):
            previous(signum, frame)
    handler._marval_sigterm = True  # type: ignore[attr-defined]
    if getattr(previous, "_marval_sigterm", False):
        return  # installed by an earlier run in this process
    signal.signal(signal.SIGTERM, handler)


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any (a collective: every process must call it at the same
    point)."""
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return bool(np.any(multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))))


def preempted(manager: ocp.CheckpointManager, step: int, agree: bool = True) -> bool:
    """Whether the run stops after `step`, the same answer on every process.

    One process: its SIGTERM flag. Several: JAX's preemption service's agreed step (read every step, as it
    requires), and, at `agree` steps (the loop's sync points: every process passes the same value), any process's
    own flag (a SIGTERM caught by our handler where the service is off), gathered from all."""
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_count() == 1:
        return _SIGTERM.is_set() or manager.reached_preemption(step)
    service = manager.reached_preemption(step)
    local = any_process(_SIGTERM.is_set()) if agree else False
    return service or local


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


class ConfigMismatchError(UserError):
    pass


# Model fields that do not change the parameters: a checkpoint may be loaded under other values.
# Fields that change how a model computes, not its parameters: a checkpoint restores across them (a run that ran out
# of memory resumes with a leaner model.remat_policy; scan_blocks keeps the per-block parameter names).
NON_ARCHITECTURAL = ("dtype", "remat", "remat_policy", "remat_blocks", "scan_blocks", "attn_dropout", "proj_dropout",
                     "label_drop_prob", "attention_impl", "kernels")


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


def check_batch(saved: dict, current: dict, where: str = "") -> None:
    """A changed global batch is refused unless train.allow_batch_change: the data order (the iterator's position
    counts batches) and the lr schedule (steps) assume the batch the checkpoint was trained with."""
    a = saved.get("train", {}).get("global_batch_size")
    b = current.get("train", {}).get("global_batch_size")
    if a is not None and b is not None and a != b and not current["train"].get("allow_batch_change", False):
        raise UserError(f"checkpoint {where} was trained with train.global_batch_size={a} but this run has {b}; "
                        f"the data order and lr schedule assume one batch size: set it back to {a}, or pass "
                        f"--config.train.allow_batch_change=True to continue with {b} anyway")


def _storage_error(e: Exception) -> bool:
    """tensorstore reports unreadable data as 'DATA_LOSS: ...', 'NOT_FOUND: ...' and so on."""
    return bool(re.match(r"[A-Z_]{5,}: ", str(e)))


class OldFormatError(ConfigMismatchError):
    """A checkpoint in a layout this version no longer resumes (a distillation state with the teacher inside)."""


def _top_keys(tree) -> set[str] | None:
    import dataclasses
    if isinstance(tree, dict) or hasattr(tree, "keys"):
        return {str(k) for k in tree.keys()}
    if dataclasses.is_dataclass(tree):
        return {f.name for f in dataclasses.fields(tree)}
    return None


def check_layout(manager, step: int, abstract_state) -> None:
    """Refuse a distillation checkpoint that holds the frozen teacher inside its state (written before the teacher
    became an input of the step, read from teacher_ckpt at every start): one line saying what to do."""
    try:
        saved = _top_keys(manager.item_metadata(step)["state"])
    except Exception:  # noqa: BLE001  (unreadable metadata: the restore itself names the error)
        return
    target = _top_keys(abstract_state)
    if saved is None or target is None or "teacher" not in saved - target or "generator" not in target:
        return
    raise OldFormatError(
        f"checkpoint {manager.directory}/{step} holds the frozen teacher inside its distillation state, a layout "
        f"this version does not resume (the teacher is now read from teacher_ckpt at every start, not saved): start "
        f"the distillation in a new workdir; the old workdir still works as student_ckpt and for sampling "
        f"(its generator's weights are read as before)")


def restore(manager, step: int, abstract_state, data_iter, current_config: dict):
    """Restore (state, config) of `step` into `abstract_state`'s structure; the data iterator in place."""
    saved_cfg = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    check_config(saved_cfg, current_config, where=f"{manager.directory}/{step}")
    check_batch(saved_cfg, current_config, where=f"{manager.directory}/{step}")
    check_layout(manager, step, abstract_state)
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
        out = manager.restore(step, args=ocp.args.Composite(**args))
    except ValueError as e:
        if not _storage_error(e) and ("tree structures do not match" in str(e) or "shape" in str(e)):
            raise ConfigMismatchError(
                f"checkpoint {manager.directory}/{step} does not fit this run's state (an optimizer or role setting "
                f"changed since it was written?): {str(e).splitlines()[0]}") from e
        raise
    return out["state"]


def read_config(ckpt_dir: str) -> dict:
    """The config a checkpoint step directory records (local or gs://, through epath)."""
    return json.loads((epath.Path(ckpt_dir) / "config" / "metadata").read_text())


# Errors of an unreadable step (orbax/tensorstore raise ValueError, a missing file OSError); a UserError (another
# config, another batch) is not corruption and ends the run.
_UNREADABLE = (ValueError, OSError, KeyError)


def _short(e: BaseException) -> str:
    """First line of an orbax/tensorstore error, without its long tensorstore spec."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0].split(" [tensorstore_spec=")[0]
    return f"{type(e).__name__}: {text[:300]}"


def _saved_restore_step(manager, step: int):
    try:
        cfg = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        return cfg.get("train", {}).get("restore_step")
    except _UNREADABLE:
        return None


def _set_aside(manager, steps, reason: str) -> None:
    """Move `steps` out of the manager's directory to <workdir>/checkpoints_set_aside/<step> (process 0)."""
    import jax
    if steps and jax.process_index() == 0:
        ckpt_dir = epath.Path(manager.directory)
        dest = ckpt_dir.parent / "checkpoints_set_aside"
        dest.mkdir(parents=True, exist_ok=True)
        for s in steps:
            target = dest / str(s)
            if target.exists():
                target = dest / f"{s}.{int(time.time())}"
            (ckpt_dir / str(s)).rename(target)
            logging.warning("checkpoint step %d moved to %s (%s)", s, target, reason)
    if steps and jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("marval_jax:checkpoints_set_aside")
    manager.reload()


def restore_run(manager, abstract_state, data_iter, current_config: dict, restore_step: int = -1):
    """Resume a run: (state, step) of `restore_step` (>= 0) or of the newest intact step; (None, None) if the
    workdir has no checkpoint. Unreadable steps are skipped with a warning naming the step and its error."""
    steps = sorted(manager.all_steps(), reverse=True)
    where = epath.Path(manager.directory)
    if restore_step is not None and restore_step >= 0:
        if restore_step not in steps:
            raise UserError(f"train.restore_step={restore_step}: no checkpoint of that step in {where}; steps there: "
                            f"{sorted(steps) or 'none'} (-1 resumes from the newest)")
        newer = [s for s in steps if s > restore_step]
        if any(_saved_restore_step(manager, s) == restore_step for s in newer):
            logging.warning("train.restore_step=%d was applied by the run that wrote step %d: resuming from the "
                            "newest step", restore_step, newer[0])
        else:
            try:
                state = restore(manager, restore_step, abstract_state, data_iter, current_config)
            except UserError:
                raise
            except _UNREADABLE as e:
                raise UserError(f"train.restore_step={restore_step}: checkpoint {where}/{restore_step} cannot be "
                                f"read ({_short(e)}); steps there: {sorted(steps)}") from e
            _set_aside(manager, newer, f"train.restore_step={restore_step} resumes from an older step")
            return state, restore_step
    if not steps:
        return None, None
    bad = {}
    for step in steps:
        try:
            state = restore(manager, step, abstract_state, data_iter, current_config)
        except UserError:
            raise
        except _UNREADABLE as e:
            bad[step] = _short(e)
            logging.warning("checkpoint %s/%d cannot be read (%s); trying the previous step", where, step, _short(e))
            continue
        _set_aside(manager, sorted(bad), "unreadable")
        return state, step
    named = "; ".join(f"step {s}: {err}" for s, err in sorted(bad.items()))
    raise UserError(f"every checkpoint in {where} is unreadable ({named}): move them away to start afresh, or "
                    f"restore a copy of the workdir")
