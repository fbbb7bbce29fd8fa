"""Parameter counts of the released configurations equal the reference's (jax.eval_shape, no allocation)."""
import jax
import numpy as np
import pytest
from flax import nnx

from configs import mar as mar_configs
from marval_jax.models.mar import MAR, MARConfig


def count(cfg: MARConfig) -> int:
    abstract = nnx.eval_shape(lambda: MAR(cfg, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("variant,expected", [("base", 207_924_768), ("large", 478.33e6), ("huge", 942.40e6)])
def test_released_param_counts(variant, expected):
    n = count(MARConfig(**mar_configs.get_config(variant).model.to_dict()))
    if variant == "base":
        assert n == expected
    else:
        assert abs(n - expected) < 0.005e6, n


def test_tiny_fixture_count(ref):
    import json
    cfg = MARConfig.from_reference_json(str(ref["config_json"]))
    assert count(cfg) == sum(int(np.prod(v.shape)) for k, v in ref.items() if k.startswith("param/"))
