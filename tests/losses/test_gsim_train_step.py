"""The distill task's jitted step (configs/marval.py:tiny): alternation ratio, per-role Adam settings and EMA,
read off the updated state after one real step.

Adam with b1 = 0 keeps the last gradient as its first moment (mu = g) and nu = b2 nu + (1 - b2) g^2, so every
parameter update can be predicted from the optimizer state alone: after n steps the last update is
-lr * mu / (sqrt(nu / (1 - b2^n)) + eps), and with b2 = 0.5 the first of two steps is recoverable from nu.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import marval as marval_configs
from marval_jax.train.distill_task import build_step
from marval_jax.train.state import RoleState

GEN = dict(lr=1e-3, eps=1e-3, b2=0.5, ema_decay=0.9)
FAKE = dict(lr=3e-3, eps=3e-2, b2=0.5, ema_decay=0.6)


def _adam_state(opt_state):
    states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
              if isinstance(s, optax.ScaleByAdamState)]
    assert len(states) == 1
    return states[0]


def _leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _perturbed(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + jnp.asarray(0.05 * rng.normal(size=x.shape), x.dtype), params)


def _close(actual, expected, tol):
    """Elementwise |actual - expected| <= tol (tol an array: per-element rounding bounds)."""
    err = np.abs(actual - expected)
    assert np.all(err <= tol), (float(np.max(err - tol)), float(np.max(err)))


def _ulp_tol(*arrays):
    """Rounding of a float32 parameter update read back as new - old: a few ulp of the larger magnitude."""
    return 4 * np.finfo(np.float32).eps * np.max(np.abs(np.stack(arrays)), axis=0) + 1e-12


def test_distill_step_alternation_per_role_adam_and_ema():
    config = marval_configs.get_config("tiny")
    config.unlock()
    config.gsim.fake_steps_per_generator_step = 2
    config.generator.update(GEN)
    config.fake_score.update(FAKE)
    config.lock()
    task = build_step(config)
    state = task.init_state(jax.random.PRNGKey(0))
    init = state.generator.params
    # three different roles (a fresh MAR's head outputs zeros: every role would agree and y = 0); the teacher is
    # the step's frozen input
    gen0, fake0 = _perturbed(init, 2), _perturbed(init, 3)
    gen_ema0 = _perturbed(init, 4)
    frozen = {"teacher": _perturbed(init, 1)}
    state = state.replace(generator=RoleState(gen0, state.generator.opt_state, gen_ema0),
                          fake=RoleState(fake0, state.fake.opt_state, fake0))
    m = config.model
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.normal(size=(2, (m.img_size // m.vae_stride // m.patch_size) ** 2,
                                                    m.vae_embed_dim * m.patch_size ** 2)), jnp.float32),
             "labels": jnp.asarray([0, 1], jnp.int32)}
    new, metrics = jax.jit(task.train_step)(state, batch, frozen)
    assert int(new.step) == 1 and np.isfinite(float(metrics["loss"]))

    # alternation: the fake role's Adam advanced fake_steps_per_generator_step = 2 times, the generator's once
    g_adam, f_adam = _adam_state(new.generator.opt_state), _adam_state(new.fake.opt_state)
    assert int(g_adam.count) == 1 and int(f_adam.count) == 2

    # generator: one step, update = -lr * g / (|g| + eps) with g = mu (b1 = 0; nu / (1 - b2) = g^2)
    n_moving = 0
    for p0, p1, mu, nu in zip(_leaves(gen0), _leaves(new.generator.params), _leaves(g_adam.mu), _leaves(g_adam.nu)):
        np.testing.assert_allclose(nu, (1 - GEN["b2"]) * mu ** 2, rtol=1e-6, atol=1e-30)
        expected = -GEN["lr"] * mu / (np.sqrt(nu / (1 - GEN["b2"])) + GEN["eps"])
        _close(p1 - p0, expected, _ulp_tol(p0, p1) + 1e-6 * GEN["lr"])
        n_moving += int(np.sum(np.abs(mu) > GEN["eps"] / 10))
    assert n_moving > 100   # gradients of the size of eps and above: the lr / eps checks have power

    # fake score: two steps. Step 2's update from (mu, nu) after it; step 1's |update| from nu_1 = 2 nu - mu^2
    # (b2 = 0.5: nu = 0.5 nu_1 + 0.5 g_2^2, nu_1 = 0.5 g_1^2), so |g_1| = sqrt(4 nu - 2 mu^2).
    b2 = FAKE["b2"]
    fake1 = []
    for p0, p2, mu, nu in zip(_leaves(fake0), _leaves(new.fake.params), _leaves(f_adam.mu), _leaves(f_adam.nu)):
        step2 = -FAKE["lr"] * mu / (np.sqrt(nu / (1 - b2 ** 2)) + FAKE["eps"])
        # |g_1|^2 = 4 nu - 2 mu^2 from a difference: float32 rounding of nu and mu^2 leaves it in [g2_lo, g2_hi];
        # lr g / (g + eps) is monotone in g, so the interval maps to the tolerance (plus the parameters' rounding
        # and a few float32 roundings of each of the two updates)
        g1sq, delta = 4 * nu - 2 * mu ** 2, 8 * np.finfo(np.float32).eps * (4 * nu + 2 * mu ** 2)
        g_lo, g_hi = np.sqrt(np.maximum(g1sq - delta, 0.0)), np.sqrt(np.maximum(g1sq + delta, 0.0))
        f = lambda g: FAKE["lr"] * g / (g + FAKE["eps"])  # noqa: E731
        g1 = np.sqrt(np.maximum(g1sq, 0.0))
        tol = _ulp_tol(p0, p2) + (f(g_hi) - f(g_lo)) + 8 * np.finfo(np.float32).eps * FAKE["lr"]
        _close(np.abs(p2 - step2 - p0), f(g1), tol)
        fake1.append(p2 - step2)

    # EMA: ema <- decay * ema + (1 - decay) * params after every update of the role
    d = GEN["ema_decay"]
    for e0, p1, e1 in zip(_leaves(gen_ema0), _leaves(new.generator.params), _leaves(new.generator.ema_params)):
        _close(e1, d * e0 + (1 - d) * p1, _ulp_tol(e0, p1, e1))
    d = FAKE["ema_decay"]
    for e0, p1, p2, e2 in zip(_leaves(fake0), fake1, _leaves(new.fake.params), _leaves(new.fake.ema_params)):
        expected = d * (d * e0 + (1 - d) * p1) + (1 - d) * p2
        _close(e2, expected, 2 * _ulp_tol(e0, p1, p2, e2) + 1e-6 * FAKE["lr"])
