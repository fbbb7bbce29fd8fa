"""`sample.profile_batches`: --mode sample / evaluate trace the chosen sampling batches into <workdir>/profile, as
training's `train.profile_steps` does (train/loop.StepProfiler); a bad pair is refused before anything loads."""
import os

import pytest
from flax import nnx

from configs import mar as mar_configs
from configs.common import with_fields
from marval_jax.user_errors import UserError


def _tiny_ckpt(tmp_path):
    from marval_jax.checkpoints.params_io import save_params
    from marval_jax.models.mar import MAR, MARConfig
    cfg = mar_configs.get_config("tiny")
    model = MAR(MARConfig(**cfg.model.to_dict()), rngs=nnx.Rngs(0))
    return cfg, save_params(str(tmp_path / "ckpt"), nnx.state(model, nnx.Param), cfg.model.to_dict())


def _traces(workdir):
    return sorted(name for _, _, names in os.walk(os.path.join(workdir, "profile")) for name in names)


def test_sample_traces_the_chosen_batches(tmp_path):
    from marval_jax.programs.sample import sample_from_workdir
    cfg, ckpt = _tiny_ckpt(tmp_path)
    workdir = str(tmp_path / "run")
    run_cfg = with_fields(cfg, {"sample.num_images": 8, "sample.batch_size": 4, "sample.num_sampling_steps": "2",
                                "sample.profile_batches": (2, 2)})
    report = sample_from_workdir(run_cfg, workdir, ckpt=ckpt)
    assert report["num_images"] == 8
    names = _traces(workdir)
    assert any(n.endswith(".xplane.pb") for n in names) and any(n.endswith(".trace.json.gz") for n in names), names
    # off by default: no profile folder
    sample_from_workdir(with_fields(run_cfg, {"sample.profile_batches": ()}), str(tmp_path / "off"), ckpt=ckpt)
    assert not os.path.exists(tmp_path / "off" / "profile")


@pytest.mark.parametrize("pair", [(2, 1), (0, 1)])
def test_bad_profile_batches_are_refused_before_loading(tmp_path, pair):
    from marval_jax.programs.sample import Sampler
    cfg = with_fields(mar_configs.get_config("tiny"), {"sample.profile_batches": pair})
    with pytest.raises(UserError, match=r"sample.profile_batches=.*expected two step numbers"):
        Sampler(cfg, str(tmp_path / "no_such_checkpoint"))   # refused before the (missing) checkpoint is read
