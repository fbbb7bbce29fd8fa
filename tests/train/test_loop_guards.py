"""train/loop.py's safeguards, run through the real loop (mesh, orbax, writers, lock) with a minimal task whose step
compiles in well under a second: w <- w * growth, loss = mean(w) of the weights before the update."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mar as mar_configs
from marval_jax.checkpoints import manager as ckpt
from marval_jax.checkpoints import workdir_lock
from marval_jax.train.loop import NonFiniteLossError, Task, train
from marval_jax.user_errors import UserError


def growth_task(growth: float) -> Task:
    def init_state(rng):
        return {"step": jnp.int32(0), "w": jnp.ones((4,), jnp.float32)}

    def train_step(state, batch):
        w = state["w"] * growth
        metrics = {"loss": jnp.mean(state["w"]), "grad_norm": jnp.float32(0.5) + 0 * batch["labels"].sum()}
        return {"step": state["step"] + 1, "w": w}, metrics

    return Task("growth", init_state, train_step, logical_axes=[], uses_data=False)


def config(**train):
    cfg = mar_configs.get_config("tiny")
    cfg.unlock()
    cfg.train.update(dict(sample_every=0, async_checkpoints=False), **train)
    cfg.lock()
    return cfg


def saved_steps(workdir):
    return ckpt.make_manager(workdir, save_interval=1, keep=10, async_save=False).all_steps()


def metric_steps(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def test_non_finite_state_between_checks_is_never_saved(tmp_path):
    """w = 1e10**k overflows float32 at k = 4 (1e40 > 3.4e38) while the loss (of w before the update) is still
    finite: only the updated-state check sees step 4. The host looks at steps 3 (save) and 6 (save)."""
    workdir = str(tmp_path / "run")
    with pytest.raises(NonFiniteLossError) as e:
        train(config(num_steps=10, ckpt_every=3, log_every=100), workdir, growth_task(1e10))
    msg = str(e.value)
    assert "non-finite updated state at step 4 (seen at the check of step 6" in msg, msg
    assert "Last finite step: 3;" in msg and "last finite checkpoint: step 3 in" in msg, msg
    assert isinstance(e.value, UserError) and len(msg.splitlines()) == 1
    assert saved_steps(workdir) == [3]
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))  # released on error


def test_non_finite_first_step_names_the_initial_state(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"step 1 .*Last finite step: 0 \(the initial state\); last finite "
                                                 r"checkpoint: none"):
        train(config(num_steps=3, ckpt_every=1, log_every=1), str(tmp_path / "run"), growth_task(np.inf))
    assert saved_steps(str(tmp_path / "run")) == []


def test_resume_drops_metric_rows_past_the_checkpoint(tmp_path):
    """A run killed after logging steps 5-7 (and half a row) but before its step-6 checkpoint: the resume writes
    each step once."""
    workdir = str(tmp_path / "run")
    cfg = config(num_steps=4, ckpt_every=2, log_every=1)
    task = growth_task(1.01)
    train(cfg, workdir, task)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        for step in (5, 6, 7):
            f.write(json.dumps({"step": step, "loss": 1.0}) + "\n")
        f.write('{"step": 8, "lo')
    train(config(num_steps=6, ckpt_every=2, log_every=1), workdir, task)
    assert metric_steps(workdir) == [1, 2, 3, 4, 5, 6]


def test_changed_batch_is_refused_and_a_held_workdir_is_refused(tmp_path):
    workdir = str(tmp_path / "run")
    task = growth_task(1.01)
    train(config(num_steps=2, ckpt_every=2, log_every=1), workdir, task)
    with pytest.raises(UserError, match=r"global_batch_size=16 but this run has 8.*allow_batch_change=True"):
        train(config(num_steps=4, ckpt_every=2, log_every=1, global_batch_size=8), workdir, task)
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))
    with workdir_lock.hold(workdir):  # another run holds the workdir
        with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
            train(config(num_steps=4, ckpt_every=2, log_every=1), workdir, task)
    assert saved_steps(workdir) == [2]
    train(config(num_steps=4, ckpt_every=2, log_every=1, global_batch_size=8, allow_batch_change=True),
          workdir, task)
    assert saved_steps(workdir) == [2, 4]
