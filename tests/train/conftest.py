"""Shared fixtures of the training tests: one tiny MAR teacher run (2 steps, a checkpoint at step 2) trained once per
session. Tests that write into a workdir take a copy (`copy_workdir`); the distillation test only reads it."""
import shutil

import pytest

from configs import mar as mar_configs

TEACHER_STEPS = 2


def tiny_teacher_config():
    cfg = mar_configs.get_config("tiny")
    cfg.unlock()
    cfg.train.update(num_steps=TEACHER_STEPS, ckpt_every=TEACHER_STEPS, sample_every=0, log_every=1)
    cfg.lock()
    return cfg


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """Workdir of `--mode=train --config=configs/mar.py:tiny` run for 2 steps (checkpoint at 2, no samples)."""
    from marval_jax.main import run
    workdir = str(tmp_path_factory.mktemp("tiny_teacher") / "run")
    run("train", tiny_teacher_config(), workdir)
    return workdir


@pytest.fixture
def copy_workdir(tiny_teacher, tmp_path):
    """A copy of the tiny teacher's workdir that a test may train on (resume) without touching the shared one."""
    def copy(name="run"):
        dst = str(tmp_path / name)
        shutil.copytree(tiny_teacher, dst)
        return dst
    return copy
