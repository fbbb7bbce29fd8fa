"""teacher -> GSIM distillation (checkpoint, resume) -> student samples -> RL with the classifier reward (resume),
through the real task entry points on the tiny configs."""
import os

import numpy as np
import pytest

from configs import marval as marval_configs, marval_rl as rl_configs


def _cfg(module, variant="tiny", **fields):
    cfg = module.get_config(variant)
    cfg.unlock()
    for k, v in fields.items():
        node = cfg
        *parts, last = k.split(".")
        for p in parts:
            node = node[p]
        node[last] = v
    cfg.lock()
    return cfg


def test_distill_then_rl_resume(tmp_path, tiny_teacher):
    from marval_jax.main import run
    quiet = {"train.sample_every": 0, "train.log_every": 1}
    teacher = tiny_teacher  # `run("train", ...)` of the tiny MAR: 2 steps, checkpoint at 2 (tests/conftest.py)

    student = str(tmp_path / "student")
    # grids at step 4 only: the resumed run compiles the grid sampler, the first run does not (one compile fewer)
    d = lambda n: _cfg(marval_configs, **{"train.num_steps": n, "train.ckpt_every": 2, "teacher_ckpt": teacher,
                                          "train.sample_every": 4, "train.log_every": 1})
    run("distill", d(2), student)
    run("distill", d(4), student)  # resumes at 2
    assert sorted(os.listdir(os.path.join(student, "checkpoints"))) == ["2", "4"]
    assert os.path.exists(os.path.join(student, "samples", "step_00000004.png"))
    report = run("sample", _cfg(marval_configs, **{"sample.num_images": 4, "sample.batch_size": 4}), student)
    assert report["sampler"] == "onestep" and report["num_images"] == 4
    with np.load(os.path.join(student, "samples_final", "onestep_K4.npz")) as z:
        assert z["images"].shape == (4, 32, 32, 1) and z["images"].dtype == np.uint8

    rl = str(tmp_path / "rl")
    r = lambda n: _cfg(rl_configs, **{"train.num_steps": n, "train.ckpt_every": 1, "student_ckpt": student, **quiet})
    run("rl", r(1), rl)
    run("rl", r(2), rl)
    with open(os.path.join(rl, "metrics.jsonl")) as f:
        lines = f.read().splitlines()
    assert len(lines) == 2 and "reward_mean" in lines[-1]


def test_distill_without_teacher_is_a_clear_error(tmp_path):
    from marval_jax.main import run
    with pytest.raises((ValueError, FileNotFoundError), match="teacher_ckpt|does not exist"):
        run("distill", _cfg(marval_configs, **{"train.num_steps": 1, "teacher_ckpt": str(tmp_path / "none")}),
            str(tmp_path / "w"))
