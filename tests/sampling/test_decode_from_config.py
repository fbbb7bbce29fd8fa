"""sampler_from_config (marval_jax/sampling/from_config.py) reads each role's fields from the shipped configs, takes
the buckets from sample.num_buckets for every role, and refuses bad values naming the field."""
import pytest

from configs import mar, marval, marval_rl
from marval_jax.sampling.ar_sampler import SamplerSpec
from marval_jax.sampling.from_config import sampler_from_config
from marval_jax.user_errors import UserError


def _unlocked(module, variant="tiny"):
    cfg = module.get_config(variant)
    cfg.unlock()
    return cfg


def test_roles_read_their_fields():
    c = _unlocked(mar)
    c.sample.update(num_iter=5, cfg=2.5, cfg_schedule="constant", num_buckets=3)
    c.train.update(sample_num_iter=6, sample_cfg=1.5)
    assert sampler_from_config(c, "eval") == SamplerSpec(5, 2.5, "constant", 3)
    assert sampler_from_config(c, "teacher_grid") == SamplerSpec(6, 1.5, "linear", 3)
    assert sampler_from_config(c, "onestep_grid") == SamplerSpec(6, 1.0, "linear", 3)
    assert sampler_from_config(c, "eval", num_iter=2, cfg=4.0) == SamplerSpec(2, 4.0, "constant", 3)


def test_rl_role_takes_buckets_from_sample_section():
    c = _unlocked(marval_rl)
    c.rl.update(num_iter=3, num_buckets=5)
    c.sample.update(num_buckets=2, cfg=3.0)
    assert sampler_from_config(c, "rl") == SamplerSpec(3, 1.0, "linear", 2)


def test_bad_values_refused_with_the_field():
    c = _unlocked(marval)
    c.sample.num_buckets = 0
    with pytest.raises(UserError, match="sample.num_buckets"):
        sampler_from_config(c, "eval")
    c.sample.num_buckets = 1
    with pytest.raises(UserError, match="train.sample_num_iter"):
        sampler_from_config(c, "onestep_grid", num_iter=0)
    c.sample.cfg_schedule = "cosine"
    with pytest.raises(UserError, match="sample.cfg_schedule"):
        sampler_from_config(c, "eval")
    with pytest.raises(ValueError, match="role"):
        sampler_from_config(c, "student")
