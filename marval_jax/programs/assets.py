"""The shipped Fashion-MNIST models (marval_jax/assets/fmnist_<role>: teacher, student, rl): each role's config and
its params directory loaded into the model. Shared by `--mode=demo` and the results tool (tools/results.py)."""
from __future__ import annotations

import os

def role_dir(assets: str, role: str) -> str:
    """The params directory of a role; also the source whose recorded generator settings its sampler uses."""
    return os.path.join(assets, f"fmnist_{role}")


FAMILY = {"teacher": "configs/mar.py", "student": "configs/marval.py", "rl": "configs/marval_rl.py"}


def role_config(role: str):
    """The fmnist config of a pipeline role (teacher / student / rl)."""
    from configs import mar, marval, marval_rl  # pylint: disable=import-outside-toplevel
    return {"teacher": mar, "student": marval, "rl": marval_rl}[role].get_config("fmnist")


def load_role(assets: str, role: str):
    """(config, MARConfig, graphdef, params) of `<assets>/fmnist_<role>`, or None when that directory is absent.
    Shared by the results run and `--mode=demo`."""
    from marval_jax.checkpoints.load import load_model_params  # pylint: disable=import-outside-toplevel
    from marval_jax.models.factory import abstract_model, model_config  # pylint: disable=import-outside-toplevel
    path = role_dir(assets, role)
    if not os.path.exists(path):
        return None
    config = role_config(role)
    cfg = model_config(config)
    graphdef, abstract = abstract_model(cfg)
    return config, cfg, graphdef, load_model_params(path, abstract, config.model.to_dict())
