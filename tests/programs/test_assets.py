"""programs/assets.py: a params directory names its own reproduction size (configs/mar.py fmnist / fmnist_l), so the
embedded default can be either; a model.json of another size is refused with its sizes."""
import json

import pytest

from marval_jax.programs import assets
from marval_jax.user_errors import UserError


def _write_model_json(path, variant, **change):
    model = assets.role_config("teacher", variant).model.to_dict()
    model.update(change)
    path.mkdir()
    (path / "model.json").write_text(json.dumps({"ema": True, "model": model}))
    return str(path)


@pytest.mark.parametrize("variant", assets.VARIANTS)
def test_recorded_variant_reads_the_sizes(tmp_path, variant):
    assert assets.recorded_variant(_write_model_json(tmp_path / "m", variant)) == variant


def test_every_role_has_both_sizes():
    for role in ("teacher", "student", "rl"):
        small, large = (assets.role_config(role, v).model for v in assets.VARIANTS)
        assert small.encoder_embed_dim < large.encoder_embed_dim
        assert large.to_dict() == assets.role_config("teacher", "fmnist_l").model.to_dict()


def test_unknown_sizes_are_refused_with_them(tmp_path):
    path = _write_model_json(tmp_path / "m", "fmnist", diffloss_w=999)
    with pytest.raises(UserError, match="diffloss_w.: 999"):
        assets.recorded_variant(path)
