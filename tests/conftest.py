"""Shared test fixtures: the reference fixture kept in the repository (tests run without ../shared)."""
import pathlib

import numpy as np
import pytest

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "mar_reference_tiny.npz"


@pytest.fixture(scope="session")
def ref():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def ref_model(ref):
    """(model, config) of the fixture's tiny MAR with converted reference weights, eval mode."""
    from flax import nnx
    from marval_jax.checkpoints.convert_mar import load_into_model
    from marval_jax.models.mar import MAR, MARConfig
    import json
    cfg = MARConfig.from_dict(dict(json.loads(str(ref["config_json"])), attn_dropout=0.0, proj_dropout=0.0))
    model = MAR(cfg, rngs=nnx.Rngs(0))
    load_into_model(model, {k[6:]: v for k, v in ref.items() if k.startswith("param/")})
    return model, cfg
