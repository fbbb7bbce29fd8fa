"""teacher -> GSIM distillation (checkpoint, resume) -> student samples -> RL with the classifier reward (resume),
through the real task entry points on the tiny configs."""
import os
import pathlib

import numpy as np
import pytest

from configs import marval as marval_configs, marval_rl as rl_configs
from configs.common import with_fields

pytestmark = pytest.mark.usefixtures("compile_cache")  # tests/conftest.py


def _cfg(module, variant="tiny", **fields):
    return with_fields(module.get_config(variant), fields)


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
    # the loop also sends the grid and the run's config to TensorBoard (train/writers.py)
    from tests.train.test_writers import read_events
    events = [e for f in pathlib.Path(student, "tensorboard").iterdir() for e in read_events(f)]
    values = [(e.step, v) for e in events for v in e.summary.value]
    assert [s for s, v in values if v.HasField("image") and v.tag == "samples"] == [4]
    assert any(v.metadata.plugin_data.plugin_name == "hparams" for _, v in values)
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


def test_one_t_init_default():
    """models/generator.py's T_INIT is the one default (configs/marval.py re-reads it): the loss dataclasses and both configs agree with it."""
    from marval_jax.losses.gsim import GSIMSettings
    from marval_jax.losses.rl import RLSettings
    assert GSIMSettings().t_init == RLSettings().t_init == marval_configs.T_INIT
    assert marval_configs.get_config("tiny").generator.t_init == marval_configs.T_INIT
    rl = rl_configs.get_config("tiny")   # -1: the student's record, else T_INIT
    assert rl.generator.t_init == -1 and RLSettings.from_config(rl.rl, rl.generator).t_init == marval_configs.T_INIT


def test_recorded_t_init_and_noise_scale_reach_every_consumer(tmp_path, tiny_teacher, caplog):
    """A student distilled with t_init 500 and noise_scale 0.5 records both (run checkpoint config, export's
    model.json); sampling with the default config (generator.t_init 753) uses the record; sample.t_init overrides it
    with a logged warning; RL's student load takes the record."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from marval_jax.checkpoints.load import load_model_params
    from marval_jax.checkpoints.params_io import recorded_generator
    from marval_jax.losses.gsim import onestep_predictor
    from marval_jax.losses.rl import RLSettings
    from marval_jax.main import run
    from marval_jax.programs.sample import generate, make_predictor, onestep_settings
    from marval_jax.tools.export_params import export
    from marval_jax.models.factory import abstract_model, model_config
    from marval_jax.train.rl_task import resolve_generator

    student = str(tmp_path / "student")
    run("distill", _cfg(marval_configs, **{"train.num_steps": 1, "train.ckpt_every": 1, "teacher_ckpt": tiny_teacher,
                                           "train.sample_every": 0, "generator.t_init": 500,
                                           "generator.noise_scale": 0.5}), student)
    rec = {"t_init": 500, "noise_scale": 0.5}
    assert recorded_generator(student) == rec
    assert recorded_generator(tiny_teacher) is None          # a teacher records no generator
    plain = _cfg(marval_configs, **{"sample.num_images": 2, "sample.batch_size": 2})
    exported = export(plain, student, str(tmp_path / "export"))
    assert recorded_generator(exported) == rec

    for source in (student, exported):
        assert onestep_settings(plain, source) == (500, 0.5)
    caplog.clear()
    assert onestep_settings(_cfg(marval_configs, **{"sample.t_init": 600}), student) == (600, 0.5)
    assert "sample.t_init=600 overrides the value 500" in caplog.text
    assert onestep_settings(plain, "") == (marval_configs.T_INIT, 1.0)   # no record: the config's values

    # the predictor built for the student is the (500, 0.5) one, not the config's (753, 1)
    cfg = model_config(plain)
    graphdef, abstract = abstract_model(cfg)
    model = nnx.merge(graphdef, load_model_params(student, abstract, plain.model.to_dict()))
    zc = jax.random.normal(jax.random.PRNGKey(1), (3, cfg.decoder_embed_dim))
    key = jax.random.PRNGKey(2)
    got = make_predictor(plain, student)(model, zc, None, jnp.float32(1.0), key)
    np.testing.assert_array_equal(got, onestep_predictor(500, 0.5)(model, zc, None, 1.0, key))
    assert not np.allclose(got, onestep_predictor(marval_configs.T_INIT, 1.0)(model, zc, None, 1.0, key))
    caplog.clear()
    images, _, _ = generate(plain, student)     # `--mode=sample` / evaluate's path reads the record too
    assert images.shape[0] == 2 and "generator.t_init=753 of the config is not used" in caplog.text

    rl = _cfg(rl_configs, **{"student_ckpt": exported})
    resolve_generator(rl)
    assert (rl.generator.t_init, rl.generator.noise_scale) == (500, 0.5)
    assert RLSettings.from_config(rl.rl, rl.generator).noise_scale == 0.5   # the RL loop samples as distilled
    caplog.clear()
    rl = _cfg(rl_configs, **{"student_ckpt": student, "generator.t_init": 700})
    resolve_generator(rl)
    assert rl.generator.t_init == 700 and "generator.t_init=700 overrides the value 500" in caplog.text


def test_fake_init_reaches_the_distill_state(tiny_teacher):
    """fake_score.init="fresh_head": after post_init the fake score has the teacher's transformer and the fresh
    init's head; "teacher" (default) copies the teacher; the generator is the teacher either way."""
    import jax
    from marval_jax.losses.gsim import HEAD_MODULE
    from marval_jax.train.distill_task import make_distill_task
    states = {}
    for init in ("teacher", "fresh_head"):
        task = make_distill_task(_cfg(marval_configs, **{"teacher_ckpt": tiny_teacher, "fake_score.init": init}))
        fresh = task.init_state(jax.random.PRNGKey(0))
        states[init] = (fresh, task.post_init(fresh, task.frozen))
    teacher = task.frozen["teacher"]   # the frozen input: not part of the state
    fresh, st = states["fresh_head"]
    n_head = n_diff = 0
    for (path, f), t, fr, g in zip(jax.tree_util.tree_flatten_with_path(st.fake.params)[0],
                                   jax.tree.leaves(teacher), jax.tree.leaves(fresh.fake.params),
                                   jax.tree.leaves(st.generator.params)):
        head = HEAD_MODULE in jax.tree_util.keystr(path)
        n_head += head
        np.testing.assert_array_equal(f, fr if head else t)
        np.testing.assert_array_equal(g, t)
        n_diff += head and not np.array_equal(fr, t)
    assert n_head > 0 and n_diff > 0      # the fresh head differs from the teacher's: the check has power
    _, st = states["teacher"]
    for f, t in zip(jax.tree.leaves(st.fake.params), jax.tree.leaves(teacher)):
        np.testing.assert_array_equal(f, t)
