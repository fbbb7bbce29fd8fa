"""The shipped Fashion-MNIST models (marval_jax/assets/fmnist_<role>: teacher, student, rl): each role's config and
its params directory loaded into the model. Shared by `--mode=demo` and the results tool (tools/results.py)."""
from __future__ import annotations

import json
import os

from marval_jax.user_errors import UserError


def role_dir(assets: str, role: str) -> str:
    """The params directory of a role; also the source whose recorded generator settings its sampler uses."""
    return os.path.join(assets, f"fmnist_{role}")


FAMILY = {"teacher": "configs/mar.py", "student": "configs/marval.py", "rl": "configs/marval_rl.py"}


VARIANTS = ("fmnist", "fmnist_l")   # the reproduction's sizes (configs/mar.py); a params directory names its own
SIZE_FIELDS = ("encoder_embed_dim", "encoder_depth", "decoder_embed_dim", "decoder_depth", "diffloss_d", "diffloss_w")


def role_config(role: str, variant: str = "fmnist"):
    """The config of a pipeline role (teacher / student / rl) at one of the reproduction's sizes."""
    from configs import mar, marval, marval_rl  # pylint: disable=import-outside-toplevel
    return {"teacher": mar, "student": marval, "rl": marval_rl}[role].get_config(variant)


def recorded_variant(path: str) -> str:
    """The variant whose model sizes a params directory's model.json records, so the shipped models can be either
    size (docs/reproduction.md); a model.json of neither is an error naming its sizes."""
    with open(os.path.join(path, "model.json")) as f:
        recorded = json.load(f)["model"]
    for variant in VARIANTS:
        model = role_config("teacher", variant).model
        if all(recorded.get(k) == model[k] for k in SIZE_FIELDS):
            return variant
    raise UserError(f"{path}/model.json records a model of sizes {({k: recorded.get(k) for k in SIZE_FIELDS})}, "
                    f"which is none of configs/mar.py's {VARIANTS}")


def load_role(assets: str, role: str):
    """(config, MARConfig, graphdef, params) of `<assets>/fmnist_<role>`, or None when that directory is absent.
    Shared by the results run and `--mode=demo`."""
    from marval_jax.checkpoints.load import load_model_params  # pylint: disable=import-outside-toplevel
    from marval_jax.models.factory import abstract_model, model_config  # pylint: disable=import-outside-toplevel
    path = role_dir(assets, role)
    if not os.path.exists(path):
        return None
    config = role_config(role, recorded_variant(path))
    cfg = model_config(config)
    graphdef, abstract = abstract_model(cfg)
    return config, cfg, graphdef, load_model_params(path, abstract, config.model.to_dict())
