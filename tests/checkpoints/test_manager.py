"""checkpoints/manager.py: resuming from the newest intact step, train.restore_step, the global-batch check."""
import logging
import os

import jax
import numpy as np
import pytest

from marval_jax.checkpoints import manager as ckpt
from marval_jax.user_errors import UserError, one_line


def _config(batch=16, restore_step=-1, allow=False):
    return {"model": {"encoder_embed_dim": 32},
            "train": {"global_batch_size": batch, "restore_step": restore_step, "allow_batch_change": allow}}


def _state(step):
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3) + step, "b": np.full((4,), step, np.float32)}


def _target():
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _state(0))


def _run_dir(tmp_path, steps, config=None):
    workdir = str(tmp_path / "run")
    m = ckpt.make_manager(workdir, save_interval=1, keep=10, async_save=False)
    for s in steps:
        assert ckpt.save(m, s, _state(s), None, config or _config(), force=True)
    return workdir, m


def _corrupt(workdir, step, how):
    state_dir = os.path.join(workdir, "checkpoints", str(step), "state")
    manifest = os.path.join(state_dir, "manifest.ocdbt")
    if how == "zero_byte_manifest":
        open(manifest, "w").close()
    elif how == "truncated_manifest":
        size = os.path.getsize(manifest)
        os.truncate(manifest, size // 2)
    elif how == "missing_data_file":
        data = os.path.join(state_dir, "d")
        for name in os.listdir(data):
            os.remove(os.path.join(data, name))
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["zero_byte_manifest", "truncated_manifest", "missing_data_file"])
def test_corrupt_latest_falls_back_to_previous_step(tmp_path, caplog, how):
    workdir, m = _run_dir(tmp_path, [1, 2])
    _corrupt(workdir, 2, how)
    with caplog.at_level(logging.WARNING):
        state, step = ckpt.restore_run(m, _target(), None, _config())
    assert step == 1
    np.testing.assert_array_equal(state["w"], _state(1)["w"])
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "/2 cannot be read" in warned and ("DATA_LOSS" in warned or "NOT_FOUND" in warned), warned
    # the unreadable step is kept for inspection, out of the manager's way: the run can save step 2 again
    assert os.path.isdir(os.path.join(workdir, "checkpoints_set_aside", "2"))
    assert m.all_steps() == [1]
    assert ckpt.save(m, 2, _state(2), None, _config(), force=True)


def test_every_step_corrupt_is_one_user_error(tmp_path):
    workdir, m = _run_dir(tmp_path, [1, 2])
    _corrupt(workdir, 1, "zero_byte_manifest")
    _corrupt(workdir, 2, "truncated_manifest")
    with pytest.raises(UserError) as e:
        ckpt.restore_run(m, _target(), None, _config())
    msg = one_line(e.value)
    assert "every checkpoint" in msg and "step 1:" in msg and "step 2:" in msg
    assert len(str(e.value).splitlines()) == 1


def test_restore_step(tmp_path):
    workdir, m = _run_dir(tmp_path, [1, 2, 3])
    with pytest.raises(UserError, match=r"restore_step=5: no checkpoint of that step .*steps there: \[1, 2, 3\]"):
        ckpt.restore_run(m, _target(), None, _config(restore_step=5), restore_step=5)
    state, step = ckpt.restore_run(m, _target(), None, _config(restore_step=2), restore_step=2)
    assert step == 2 and float(state["b"][0]) == 2
    assert m.all_steps() == [1, 2] and os.path.isdir(os.path.join(workdir, "checkpoints_set_aside", "3"))
    # the relaunch of that run (same restore_step in its config) resumes from its own newer steps, not from 2 again
    assert ckpt.save(m, 4, _state(4), None, _config(restore_step=2), force=True)
    state, step = ckpt.restore_run(m, _target(), None, _config(restore_step=2), restore_step=2)
    assert step == 4 and m.all_steps() == [1, 2, 4]


def test_empty_workdir_is_a_fresh_start_and_restore_step_there_is_refused(tmp_path):
    _, m = _run_dir(tmp_path, [])
    assert ckpt.restore_run(m, _target(), None, _config()) == (None, None)
    with pytest.raises(UserError, match="steps there: none"):
        ckpt.restore_run(m, _target(), None, _config(), restore_step=1)


def test_changed_global_batch_is_refused_unless_allowed(tmp_path):
    _, m = _run_dir(tmp_path, [1], _config(batch=16))
    with pytest.raises(UserError, match=r"global_batch_size=16 but this run has 32.*allow_batch_change=True"):
        ckpt.restore_run(m, _target(), None, _config(batch=32))
    _, step = ckpt.restore_run(m, _target(), None, _config(batch=32, allow=True))
    assert step == 1


def test_config_mismatch_is_a_user_error_not_corruption(tmp_path):
    _, m = _run_dir(tmp_path, [1, 2])
    other = _config()
    other["model"]["encoder_embed_dim"] = 64
    with pytest.raises(ckpt.ConfigMismatchError, match="encoder_embed_dim"):
        ckpt.restore_run(m, _target(), None, other)
    assert m.all_steps() == [1, 2]  # nothing set aside


def test_distill_checkpoint_with_the_teacher_inside_is_refused(tmp_path):
    """The old distillation layout (the frozen teacher saved in the state) is refused with one line naming the step
    and what to do; the same state without the teacher restores."""
    role = {"params": _state(1), "ema_params": _state(1)}
    new_state = {"step": np.int32(1), "generator": role, "fake": role}
    workdir = str(tmp_path / "run")
    m = ckpt.make_manager(workdir, save_interval=1, keep=10, async_save=False)
    assert ckpt.save(m, 1, dict(new_state, teacher=_state(0)), None, _config(), force=True)
    target = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), new_state)
    with pytest.raises(ckpt.OldFormatError) as e:
        ckpt.restore_run(m, target, None, _config())
    msg = one_line(e.value)
    assert f"{m.directory}/1 holds the frozen teacher" in msg and "new workdir" in msg and msg == str(e.value)
    assert ckpt.save(m, 2, new_state, None, _config(), force=True)
    state, step = ckpt.restore_run(m, target, None, _config(), restore_step=2)
    assert step == 2 and set(state) == {"step", "generator", "fake"}
