"""Stopping a run when a logged metric stops improving (`train.stop_on_plateau`).

MARVAL-RL's classifier reward saturates: on the Fashion-MNIST student it reached log p -0.006 by step 200, and the
steps after that only traded diversity for the last thousandths of reward (docs/results.md). A run that stops at the
plateau keeps what the reward had already bought.

The decision is made on the host at the log steps, from the logged window averages (train/loop.py), which every
process reads identically: all processes stop after the same step, with no extra collective; the loop then saves
that step and exits 0, as it does on preemption. The count restarts when a run resumes.
"""
from __future__ import annotations

import dataclasses
import math

from marval_jax.user_errors import UserError

MODES = ("max", "min")


@dataclasses.dataclass
class Plateau:
    metric: str        # a logged scalar, e.g. "reward_mean"
    mode: str          # "max": higher is better; "min": lower is better
    patience: int      # log windows in a row without an improvement larger than min_delta
    min_delta: float   # in the metric's units
    best: float | None = None
    since_best: int = 0

    @classmethod
    def from_config(cls, tc) -> "Plateau | None":
        """The tracker of the train config `tc`, or None when `train.stop_on_plateau` is empty (off)."""
        metric = tc.get("stop_on_plateau", "")
        if not metric:
            return None
        return cls(metric, tc.plateau_mode, int(tc.plateau_patience), float(tc.plateau_min_delta))

    def update(self, scalars: dict) -> bool:
        """Feeds one logged window; True once the metric has gone `patience` windows without beating its best by
        more than `min_delta` (small gains add up: they count once their sum exceeds it)."""
        if self.metric not in scalars:
            raise UserError(f"train.stop_on_plateau={self.metric!r} is not a logged metric of this run; choose one "
                            f"of {', '.join(sorted(scalars))}")
        value = float(scalars[self.metric])
        if self.best is None:
            gain = math.inf  # the first window sets the best
        else:
            gain = value - self.best if self.mode == "max" else self.best - value
        if gain > self.min_delta:
            self.best, self.since_best = value, 0
        else:
            self.since_best += 1
        return self.since_best >= self.patience

    def describe(self) -> str:
        return (f"{self.metric} has not {'risen' if self.mode == 'max' else 'fallen'} by more than {self.min_delta:g} "
                f"beyond its best ({self.best:.6g}) for {self.since_best} log windows")
