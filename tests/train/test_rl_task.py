"""The RL task passes its frozen weights (reward, prompt embeddings, decoder) through the jit boundary."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import marval_rl as rl_configs

pytestmark = pytest.mark.usefixtures("compile_cache")  # tests/conftest.py


def test_reward_weights_are_step_arguments_not_constants():
    """Closed over, the reward's weights would be baked into the compiled step as constants (a CLIP-H reward: ~1B
    parameters in the program). The task's step takes them as `frozen`: its lowered program stays far smaller than
    the closed-over variant of the same step, which carries the weights' values (so this check can fail)."""
    from marval_jax.rewards.registry import make_reward
    from marval_jax.train.rl_task import make_rl_task
    config = rl_configs.get_config("tiny")
    task = make_rl_task(config)
    assert set(task.frozen) == {"reward", "prompts", "decoder"}
    ref = make_reward(config.rl.reward, config.rl.reward_config.to_dict()).params
    got_leaves, ref_leaves = jax.tree.leaves(task.frozen["reward"]), jax.tree.leaves(ref)
    assert len(got_leaves) == len(ref_leaves) > 0
    for a, b in zip(got_leaves, ref_leaves):
        np.testing.assert_array_equal(a, b)
    n_reward = sum(int(np.size(x)) for x in got_leaves)
    assert n_reward > 10_000

    state = jax.eval_shape(task.init_state, jax.random.PRNGKey(0))
    batch = {"labels": jax.ShapeDtypeStruct((2,), jnp.int32)}
    as_argument = jax.jit(task.train_step).lower(state, batch, task.frozen).as_text()
    closed_over = jax.jit(lambda s, b: task.train_step(s, b, task.frozen)).lower(state, batch).as_text()
    # a float32 constant is 8 hex digits in the text: the closed-over program is longer by the weights' values
    assert len(closed_over) - len(as_argument) > 4 * n_reward
    main = as_argument[as_argument.index("func.func public @main"):].split("\n", 1)[0]
    assert main.count("%arg") >= len(jax.tree.leaves(state)) + 1 + len(got_leaves)  # state, labels, weights


def test_gsim_regulariser_builds_and_changes_the_step(tmp_path):
    """rl.regularizer="gsim" (recommended in docs/rl.md) builds: the task loads the frozen teacher (fake score "" =
    the teacher) into `frozen["gsim"]`, reads data for the contexts, and the step's regulariser is GSIM's generator
    loss on the batch's tokens: finite, non-zero, in the loss with rl.reg_weight, and it changes the update (the
    same compiled step on other context tokens, same labels: same reward, other parameters after the step)."""
    import pytest
    from flax import nnx
    from marval_jax.checkpoints.params_io import save_params
    from marval_jax.models.mar import MAR, MARConfig
    from marval_jax.train.rl_task import make_rl_task
    from marval_jax.user_errors import UserError

    config = rl_configs.get_config("tiny")
    config.unlock()
    config.rl.regularizer, config.rl.reg_weight = "gsim", 1.0
    config.lock()
    with pytest.raises(UserError, match="teacher_ckpt"):
        make_rl_task(config)

    cfg = MARConfig.from_dict(config.model.to_dict())
    rng = np.random.default_rng(0)
    perturb = lambda tree: jax.tree.map(  # noqa: E731  (a fresh MAR's head outputs zeros)
        lambda x: x + jnp.asarray(0.05 * rng.normal(size=x.shape), x.dtype), tree)
    teacher = perturb(nnx.split(MAR(cfg, rngs=nnx.Rngs(1)))[1])
    save_params(str(tmp_path / "teacher"), teacher, config.model.to_dict())
    config.unlock()
    config.teacher_ckpt = str(tmp_path / "teacher")
    config.lock()
    task = make_rl_task(config)
    assert task.uses_data and set(task.frozen) == {"reward", "prompts", "decoder", "gsim"}
    for a, b in zip(jax.tree.leaves(task.frozen["gsim"]["teacher"]), jax.tree.leaves(teacher)):
        np.testing.assert_array_equal(a, b)

    state = task.init_state(jax.random.PRNGKey(0))
    student = perturb(state.params)
    state = state.replace(params=student, ema_params=student, ref_params=student)
    step = jax.jit(task.train_step)
    labels = jnp.asarray([0, 1], jnp.int32)
    shape = (2, cfg.seq_len, cfg.token_dim)
    outs = [step(state, {"labels": labels, "tokens": jnp.asarray(rng.normal(size=shape), jnp.float32)}, task.frozen)
            for _ in range(2)]
    for _, m in outs:
        reg = float(m["reg"])
        assert np.isfinite(reg) and reg != 0.0
        np.testing.assert_allclose(float(m["loss"]), -float(m["reward_mean"]) + reg, rtol=1e-5, atol=1e-6)
    (s1, m1), (s2, m2) = outs
    assert float(m1["reward_mean"]) == float(m2["reward_mean"])      # the RL part saw the same trajectory
    assert float(m1["reg"]) != float(m2["reg"])
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params))]
    assert max(moved) > 0.1 * float(config.generator.lr)              # the regulariser's gradient changed the step
