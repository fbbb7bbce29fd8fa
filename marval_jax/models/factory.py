"""The model factory every program shares: the MARConfig of a run config, the abstract model (graph definition and
parameter shapes, nothing allocated; what the converters and loaders fill), and `Frozen`, a frozen model as a pytree
(weights as leaves, its apply function static). Nothing here reads a file: the tokenizer decoders, which load the
VAE's weights, are in checkpoints/decoders.py (a layer up).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from marval_jax.models.mar import MAR, MARConfig
from marval_jax.user_errors import UserError


def model_config(config) -> MARConfig:
    """The MARConfig of a run config's `model` section. A value MARConfig refuses is a UserError naming the run
    config's field (`model.<name>`): MARConfig.__post_init__ holds the one check per field."""
    try:
        return MARConfig(**config.model.to_dict())
    except ValueError as e:
        raise UserError(str(e).replace("MARConfig.", "model.")) from e


def abstract_model(cfg: MARConfig):
    """(graphdef, abstract params) without allocating: the structure converters and checkpoint loaders fill."""
    return nnx.split(nnx.eval_shape(lambda: MAR(cfg, rngs=nnx.Rngs(0))))


def grid_labels(n: int, class_num: int) -> jax.Array:
    """Labels of an n-image sample grid: the classes in turn."""
    return jnp.arange(n) % class_num


@flax.struct.dataclass
class Frozen:
    """A frozen model as a pytree: `params` are its leaves (arguments of a jitted step, replicated, never closed
    over), `fn(params, *args)` its pure apply function (static: part of the tree structure). `Frozen(...)(*args)`
    applies it. With abstract params (ShapeDtypeStructs) it describes the input without any weight."""
    params: Any
    fn: Callable = flax.struct.field(pytree_node=False)

    def __call__(self, *args):
        return self.fn(self.params, *args)
