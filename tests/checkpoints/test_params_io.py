"""Params-only checkpoints: params.npz (optionally float16) and orbax params/ round trips, strict npz loading, and
export_params.export from a run workdir, on the tiny MAR."""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import mar as mar_configs
from marval_jax.checkpoints.params_io import load_params, save_params
from marval_jax.tree_paths import flatten_state
from marval_jax.models.mar import MAR
from marval_jax.models.factory import abstract_model, model_config


@pytest.fixture(scope="module")
def tiny():
    """(run config, model config dict, abstract params, initialised params) of configs/mar.py:tiny."""
    config = mar_configs.get_config("tiny")
    cfg = model_config(config)
    _, abstract = abstract_model(cfg)
    params = jax.jit(lambda key: nnx.split(MAR(cfg, rngs=nnx.Rngs(params=key)))[1])(jax.random.PRNGKey(0))
    return config, config.model.to_dict(), abstract, params


def _flat(state):
    return {k: np.asarray(jax.device_get(v)) for k, v in flatten_state(state).items()}


def test_npz_float16_round_trip_is_the_rounded_weights_in_model_dtypes(tmp_path, tiny):
    _, model_cfg, abstract, params = tiny
    out = save_params(str(tmp_path / "p"), params, model_cfg, fmt="npz", dtype="float16")
    with np.load(os.path.join(out, "params.npz")) as z:
        assert {z[k].dtype for k in z.files} == {np.dtype("float16")}
    with open(os.path.join(out, "model.json")) as f:
        meta = json.load(f)
    assert meta["model"] == model_cfg and meta["stored_dtype"] == "float16"
    want, got = _flat(params), _flat(load_params(out, abstract, model_cfg))
    assert set(got) == set(want)
    wanted_dtypes = {k: v.dtype for k, v in flatten_state(abstract).items()}
    rounded_somewhere = False
    for k, v in want.items():
        assert got[k].dtype == wanted_dtypes[k] == np.float32, k
        np.testing.assert_array_equal(got[k], v.astype(np.float16).astype(v.dtype), err_msg=k)
        rounded_somewhere |= not np.array_equal(got[k], v)
    assert rounded_somewhere  # the test would not see a missing cast otherwise


def test_npz_without_dtype_and_orbax_are_exact(tmp_path, tiny):
    _, model_cfg, abstract, params = tiny
    want = _flat(params)
    for fmt in ("npz", "orbax"):
        out = save_params(str(tmp_path / fmt), params, model_cfg, fmt=fmt)
        assert os.path.exists(os.path.join(out, "params.npz" if fmt == "npz" else "params"))
        got = _flat(load_params(out, abstract, model_cfg))
        assert set(got) == set(want)
        for k, v in want.items():
            assert got[k].dtype == v.dtype, (fmt, k)
            np.testing.assert_array_equal(got[k], v, err_msg=f"{fmt} {k}")
    with open(tmp_path / "npz" / "model.json") as f:
        assert json.load(f)["stored_dtype"] == "as trained"


def _rewrite(directory, edit):
    path = os.path.join(directory, "params.npz")
    with np.load(path) as z:
        flat = {k: z[k] for k in z.files}
    edit(flat)
    np.savez(path, **flat)


def test_npz_that_does_not_fit_the_model_names_the_key(tmp_path, tiny):
    _, model_cfg, abstract, params = tiny
    key = "class_emb/embedding"
    assert key in flatten_state(abstract)

    def drop(flat):
        del flat[key]

    def add(flat):
        flat["not_a/param"] = np.zeros(3, np.float32)

    def reshape(flat):
        flat[key] = np.zeros((3, 5), np.float32)

    for name, edit, pattern in [("missing", drop, f"missing.*{key}"), ("extra", add, "unexpected.*not_a/param"),
                                ("shape", reshape, f"{key} has shape \\(3, 5\\)")]:
        out = save_params(str(tmp_path / name), params, model_cfg, fmt="npz")
        _rewrite(out, edit)
        with pytest.raises(ValueError, match=pattern):
            load_params(out, abstract, model_cfg)


def test_bad_format_and_dtype_with_orbax_are_refused(tmp_path, tiny):
    _, model_cfg, _, params = tiny
    with pytest.raises(ValueError, match="fmt must be"):
        save_params(str(tmp_path / "a"), params, model_cfg, fmt="pickle")
    with pytest.raises(ValueError, match="only for fmt='npz'"):
        save_params(str(tmp_path / "b"), params, model_cfg, fmt="orbax", dtype="float16")
    assert not os.path.exists(tmp_path / "b" / "params")


def test_export_from_a_run_workdir(tmp_path, tiny):
    """A run checkpoint written by the loop's own save (no training): EMA by default, raw weights on request."""
    from marval_jax.checkpoints import manager as ckpt
    from marval_jax.tools.export_params import export
    from marval_jax.train.loop import config_json
    from marval_jax.train.mar_task import make_mar_task
    config, model_cfg, abstract, _ = tiny
    state = make_mar_task(config).init_state(jax.random.PRNGKey(0))
    state = state.replace(ema_params=jax.tree_util.tree_map(lambda x: x * 0.5 + 0.25, state.params))
    workdir = str(tmp_path / "run")
    manager = ckpt.make_manager(workdir, save_interval=1, keep=1, async_save=False)
    assert ckpt.save(manager, 3, state, None, config_json(config), force=True)
    manager.wait_until_finished()
    manager.close()

    out = export(config, workdir, str(tmp_path / "ema"), "npz", "float16")
    with open(os.path.join(out, "model.json")) as f:
        meta = json.load(f)
    assert meta["exported_from"] == workdir and meta["ema"] is True and meta["stored_dtype"] == "float16"
    assert meta["model"] == model_cfg and meta["sampling"]["num_iter"] == config.sample.num_iter
    got = _flat(load_params(out, abstract, model_cfg))
    for k, v in _flat(state.ema_params).items():
        np.testing.assert_array_equal(got[k], v.astype(np.float16).astype(np.float32), err_msg=k)

    raw = export(config, workdir, str(tmp_path / "raw"), "npz", None, use_ema=False)
    got = _flat(load_params(raw, abstract, model_cfg))
    for k, v in _flat(state.params).items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
