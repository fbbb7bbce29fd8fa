"""Train-state pytrees. The NNX graphdef stays outside (static); only arrays cross the jit boundary."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    """One trained role: its parameters, optimizer state and EMA of the parameters."""
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array  # the run's base key; step keys are fold_in(rng, step), so a resumed run draws the same keys


@flax.struct.dataclass
class RoleState:
    params: Any
    opt_state: Any
    ema_params: Any


@flax.struct.dataclass
class DistillState:
    """Role-keyed GSIM state: the generator and the fake score. The frozen teacher is not state: it is an input of
    the step (train/distill_task.py `load_frozen`) and no checkpoint holds it."""
    step: jax.Array
    generator: RoleState
    fake: RoleState
    rng: jax.Array


@flax.struct.dataclass
class RLState:
    """The RL-trained generator plus the frozen reference generator (the l2 regulariser's anchor)."""
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    ref_params: Any
    rng: jax.Array
