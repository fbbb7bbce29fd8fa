"""The RL task passes its frozen weights (reward, prompt embeddings, decoder) through the jit boundary."""
import jax
import jax.numpy as jnp
import numpy as np

from configs import marval_rl as rl_configs


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
