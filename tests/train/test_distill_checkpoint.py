"""A distillation checkpoint holds the trained roles only (the frozen teacher is an input, read from teacher_ckpt),
and a checkpoint of the old layout, with the teacher inside the state, is refused with one clear line."""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import marval as marval_configs
from marval_jax.checkpoints import manager as ckpt
from marval_jax.user_errors import UserError

pytestmark = pytest.mark.usefixtures("compile_cache")  # tests/conftest.py


def _config(teacher):
    cfg = marval_configs.get_config("tiny")
    cfg.unlock()
    cfg.train.update(num_steps=1, ckpt_every=1, sample_every=0, log_every=1, async_checkpoints=False)
    cfg.teacher_ckpt = teacher
    cfg.lock()
    return cfg


def _nbytes(tree):
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_checkpoint_has_no_teacher_and_the_old_layout_is_refused(tmp_path, tiny_teacher):
    from marval_jax.main import run
    from marval_jax.models.factory import abstract_model, model_config
    config = _config(tiny_teacher)
    new = str(tmp_path / "new")
    run("distill", config, new)

    m = ckpt.make_manager(new, save_interval=1, keep=5, async_save=False)
    raw = m.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert set(raw) == {"step", "generator", "fake", "rng"}
    # what is saved: two trained roles, each params + EMA + Adam's two moments (4 model copies, + Adam's counters),
    # and nothing of the size of a fifth (the teacher)
    model_bytes = _nbytes(abstract_model(model_config(config))[1])
    saved = _nbytes(raw)
    assert 8 * model_bytes <= saved < 9 * model_bytes, (saved, model_bytes)

    # the old layout: the same state with the teacher inside, as distillation checkpoints used to be written
    old = str(tmp_path / "old")
    om = ckpt.make_manager(old, save_interval=1, keep=5, async_save=False)
    assert ckpt.save(om, 1, dict(raw, teacher=raw["generator"]["params"]), None, ckpt.read_config(
        os.path.join(new, "checkpoints", "1")), force=True)
    with pytest.raises(UserError, match="holds the frozen teacher inside its distillation state.*new workdir"):
        run("distill", config, old)
