"""sample.kv_cache (configs/common.py) as a user setting: sampler_from_config turns it into the SamplerSpec's cache
policy, make_sampler runs it, and the programs (--mode sample / evaluate, the demo, tools/results.py) read it.

The samplers' outputs are pinned by the recording of tests/fixtures/decode_recorded.npz (tests/sampling/
test_decode.py): kv_cache="none" built from a config is the uncached one-step sampler bit for bit (both built here)
and the recorded one to the reassociation bound test_decode.py derives (the recording is another machine's); "approx"
(r = 1, R = 2) is the recorded approximate cache to the same bound, and is not the uncached sampler."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import marval as marval_configs
from configs.common import with_fields
from marval_jax.sampling.ar_sampler import SamplerSpec, make_sampler, onestep_predictor
from marval_jax.sampling.decode import CachePolicy
from marval_jax.sampling.from_config import sampler_from_config
from marval_jax.tools.parity import rel_err
from marval_jax.user_errors import UserError
from tolerances import mar_depth, reassociation_atol

_SCRIPT = pathlib.Path(__file__).parents[1] / "fixtures" / "make_decode_fixture.py"
_spec = importlib.util.spec_from_file_location("make_decode_fixture", _SCRIPT)
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)

# the recorded one-step samplers: K = 4, no CFG, 4 buckets (onestep, cached_approx with ("approx", 1, 2))
RECORDED = {"sample.num_iter": 4, "sample.cfg": 1.0, "sample.cfg_schedule": "linear", "sample.num_buckets": 4}


def config(**fields):
    return with_fields(marval_configs.get_config("tiny"), {**RECORDED, **fields})


@pytest.fixture(scope="module")
def recorded():
    with np.load(fx.OUT) as data:
        return {k: data[k] for k in ("onestep", "cached_approx")}


def run(spec):
    graphdef, params = fx.tiny()
    fn = make_sampler(graphdef, spec, onestep_predictor(5), seq_len=fx.CFG.seq_len, buffer_size=fx.CFG.buffer_size,
                      token_dim=fx.CFG.token_dim)
    return np.asarray(fn(params, jnp.asarray(fx.LABELS), jax.random.PRNGKey(fx.SEED)))


def test_default_is_uncached_and_equals_the_recorded_sampler(recorded):
    spec = sampler_from_config(config(), "eval")
    assert marval_configs.get_config("tiny").sample.kv_cache == "none"
    assert spec.cache == CachePolicy("none")
    got = run(spec)
    np.testing.assert_array_equal(got, run(SamplerSpec(num_iter=4, num_buckets=4)))   # the uncached sampler itself
    assert rel_err(got, recorded["onestep"]) < reassociation_atol(4 * (1 + 1) * mar_depth(fx.CFG), 1.0)


def test_approx_from_config_is_the_recorded_approximate_cache(recorded):
    spec = sampler_from_config(config(**{"sample.kv_cache": "approx", "sample.kv_reuse_after": 1,
                                         "sample.kv_refresh_every": 2}), "eval")
    assert spec.cache == CachePolicy("approx", 1, 2) and spec.cache.label == "approx r=1 R=2"
    got = run(spec)
    # test_decode.chain_tol(4, 1): 4 AR steps, each a MAR pass and one head pass
    tol = reassociation_atol(4 * (1 + 1) * mar_depth(fx.CFG), 1.0)
    assert rel_err(got, recorded["cached_approx"]) < tol
    assert rel_err(got, recorded["onestep"]) > 10 * tol  # the cache is used: stale keys/values change the samples


def test_only_the_eval_role_caches():
    c = config(**{"sample.kv_cache": "approx"})
    assert sampler_from_config(c, "eval").cache == CachePolicy("approx", 2, 4)  # the config's default r, R
    for role in ("teacher_grid", "onestep_grid"):
        assert sampler_from_config(c, role).cache == CachePolicy("none")


@pytest.mark.parametrize("fields,match", [
    ({"sample.kv_cache": "fast"}, "sample.kv_cache must be one of none, approx, exact, got 'fast'"),
    ({"sample.kv_cache": "exact"}, "sample.kv_cache='exact' needs model.attention='causal'"),
    ({"sample.kv_cache": "approx", "model.attention": "causal"}, "use sample.kv_cache='exact'"),
    ({"sample.kv_cache": "approx", "sample.kv_refresh_every": 0}, "sample.kv_refresh_every must be >= 1"),
    ({"sample.kv_cache": "approx", "sample.kv_reuse_after": -1}, "sample.kv_reuse_after must be >= 0"),
])
def test_bad_settings_are_one_line_user_errors(fields, match):
    with pytest.raises(UserError, match=match) as e:
        sampler_from_config(config(**fields), "eval")
    assert "\n" not in str(e.value)


def test_exact_on_a_causal_model():
    c = config(**{"sample.kv_cache": "exact", "model.attention": "causal"})
    assert sampler_from_config(c, "eval").cache == CachePolicy("exact")


def test_sample_tag_names_the_cache():
    from marval_jax.programs.sample import sample_tag
    assert sample_tag(config()) == "onestep_K4"  # unchanged file names for uncached runs
    assert sample_tag(config(**{"sample.kv_cache": "approx"})) == "onestep_K4_kvapprox2-4"
    assert sample_tag(config(**{"sample.kv_cache": "exact"})) == "onestep_K4_kvexact"


def test_demo_reads_the_cache_setting(tmp_path):
    """The demo passes its config's kv_cache to every role's sampler: 'exact' on the shipped (bidirectional)
    student is refused before anything compiles."""
    from configs import demo as demo_configs
    from marval_jax.programs import demo
    cfg = demo_configs.get_config()
    cfg.unlock()
    cfg.kv_cache = "exact"
    cfg.lock()
    with pytest.raises(UserError, match="sample.kv_cache='exact' needs model.attention='causal'"):
        demo.run_demo(cfg, str(tmp_path / "demo"))


def test_results_tool_cache_values(tmp_path):
    """tools/results.py --cache sets the sample section's fields of the role's config; its sampler is built from
    them (sampler_from_config), so a cache the model cannot use is refused like --mode sample refuses it."""
    from marval_jax.programs.assets import load_role
    from marval_jax.programs.demo import ASSETS
    from marval_jax.tools import results
    assert results.kv_fields("none") == {"kv_cache": "none"}
    assert results.kv_fields("2,4") == {"kv_cache": "approx", "kv_reuse_after": 2, "kv_refresh_every": 4}
    for bad in ("2", "a,b", "1,0", "-1,4"):
        with pytest.raises(UserError, match="--cache"):
            results.kv_fields(bad)
    with pytest.raises(UserError, match="--cache takes"):  # before any model or FID network loads
        results.main(["run", "--out", str(tmp_path), "--cache", "fast"])
    ev = object.__new__(results.Evaluator)  # the real sampler method on the shipped student, no FID network
    ev.models, ev.assets, ev.samplers, ev.sets = {"student": load_role(ASSETS, "student")}, ASSETS, {}, {}
    ev.sampler("student", 4, 1.0, "1,3")
    assert sampler_from_config(ev.models["student"][0], "eval").cache == CachePolicy("approx", 1, 3)
    with pytest.raises(UserError, match="needs model.attention='causal'"):
        ev.sampler("student", 4, 1.0, "exact")
    # --set: the role's config changes and its sampler is a program of its own (the predictor holds the setting)
    ev.set_sample("student", ["sample.noise_scale=0.85"])
    assert ev.models["student"][0].sample.noise_scale == 0.85
    ev.sampler("student", 4, 1.0, "1,3")
    assert len(ev.samplers) == 2


def test_sample_mode_checks_the_cache_before_loading(tmp_path):
    """--mode sample / evaluate (programs.sample.Sampler): a bad sample.kv_cache is the error, not the missing
    checkpoint it would have loaded first."""
    from marval_jax.programs.sample import Sampler
    with pytest.raises(UserError, match="sample.kv_cache must be one of"):
        Sampler(config(**{"sample.kv_cache": "fast"}), str(tmp_path / "no_such_run"))
