"""train/plateau.py and train.stop_on_plateau: the tracker's arithmetic, its config checks, and the real loop
stopping, saving and exiting cleanly at the plateau (the minimal growth task of test_loop_guards.py)."""
import pytest

from marval_jax import config_checks
from marval_jax.train.loop import train
from marval_jax.train.plateau import Plateau
from marval_jax.user_errors import UserError
from tests.train.test_loop_guards import config, growth_task, metric_steps, saved_steps


def _feed(tracker, values, metric="r"):
    return [tracker.update({metric: v, "other": 0.0}) for v in values]


def test_stops_after_patience_windows_without_a_gain_larger_than_min_delta():
    assert _feed(Plateau("r", "max", 2, 0.01), [0.0, 0.5, 0.505, 0.509, 0.508]) == [False, False, False, True, True]
    # small gains add up: 0.006 + 0.006 beats the best by more than 0.01 and resets the count
    assert _feed(Plateau("r", "max", 2, 0.01), [0.0, 0.006, 0.012, 0.013, 0.014]) == [False, False, False, False, True]
    assert _feed(Plateau("r", "min", 1, 0.0), [3.0, 2.0, 2.0]) == [False, False, True]
    assert _feed(Plateau("r", "max", 1, 0.0), [3.0, 2.0]) == [False, True]  # worse counts as no gain


def test_an_unlogged_metric_names_the_logged_ones():
    with pytest.raises(UserError, match="train.stop_on_plateau='reward' is not a logged metric.*other, r"):
        Plateau("reward", "max", 1, 0.0).update({"r": 1.0, "other": 0.0})


@pytest.mark.parametrize("field,value,match", [("plateau_mode", "up", "choose one of max, min"),
                                               ("plateau_patience", 0, "integer >= 1"),
                                               ("plateau_min_delta", -0.1, "number >= 0")])
def test_config_checks_refuse_bad_plateau_fields(field, value, match):
    with pytest.raises(UserError, match=f"train.{field}=.*{match}"):
        config_checks.check_train(config(stop_on_plateau="loss", **{field: value}))
    config_checks.check_train(config(**{field: value}))  # off: the other fields are not read


def test_the_loop_saves_and_exits_at_the_plateau(tmp_path, capsys):
    """loss = mean(w) halves every step, so under mode "max" it never improves on its first window: with windows of
    2 steps and patience 2 the run stops after step 6 of 40 and saves it; under "min" it runs to the end."""
    workdir = str(tmp_path / "run")
    train(config(num_steps=40, ckpt_every=100, log_every=2, stop_on_plateau="loss", plateau_mode="max",
                 plateau_patience=2), workdir, growth_task(0.5))
    assert saved_steps(workdir) == [6] and metric_steps(workdir) == [2, 4, 6]
    assert "growth: stopped: loss has not risen by more than 0 beyond its best (0.75) for 2 log windows at step 6" \
        in capsys.readouterr().out
    workdir = str(tmp_path / "run_min")
    train(config(num_steps=12, ckpt_every=100, log_every=2, stop_on_plateau="loss", plateau_mode="min",
                 plateau_patience=1), workdir, growth_task(0.5))
    assert saved_steps(workdir) == [12]
