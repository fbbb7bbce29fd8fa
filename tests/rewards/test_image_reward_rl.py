"""rl.reward=image_reward end to end on the tiny RL config (random ImageReward weights, width 32; K = 2 AR
iterations): the RL task loads it with its class prompts, one train step has a finite, non-zero gradient; and the
ImageReward column of --mode evaluate scores sampled batches against their class prompts."""
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from configs import marval_rl

TINY = {"vision": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=16, patch_size=8),
        "text": dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=40, encoder_width=32)}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "high", "-", "quality", "and", "harmonious", "picture", "of", "t",
         "shirt", "/", "top", "trouser", "pullover", "dress", "coat", "sandal", "sneaker", "bag", "ankle", "boot"]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(WORDS) + "\n")
    return str(path)


def _config(**rl):
    config = marval_rl.get_config("tiny")
    config.unlock()
    config.rl.update(rl)
    config.lock()
    return config


def test_rl_step_with_image_reward(vocab):
    from marval_jax.train.rl_task import make_rl_task
    reward_config = mlc.ConfigDict(dict(checkpoint="", image_reward_config=TINY, seed=0, vocab_path=vocab,
                                        dtype="float32"))
    config = _config(reward="image_reward", reward_config=reward_config, num_iter=2)
    task = make_rl_task(config)
    tokens = np.asarray(task.frozen["prompts"])
    assert tokens.shape == (10, 2 * 35)          # one prompt per Fashion-MNIST class: [ids | mask]
    assert len({tuple(row) for row in tokens}) == 10 and set(tokens[:, 0]) == {WORDS.index("[CLS]")}

    fz = task.frozen
    # the step's loss is -mean(reward) (no regulariser): its gradient is the reward's, through the decoded pixels
    state = jax.jit(task.init_state)(jax.random.PRNGKey(0))
    new, metrics = jax.jit(task.train_step)(state, {"labels": jnp.zeros((2,), jnp.int32)}, fz)
    assert all(np.isfinite(float(v)) for v in jax.tree.leaves(metrics))
    assert float(metrics["grad_norm"]) > 0
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.abs(a - b).max(), new.params, state.params))
    assert max(float(m) for m in moved) > 0 and int(new.step) == 1


def test_evaluate_column(vocab, tmp_path):
    from flax import nnx
    from marval_jax.checkpoints.convert_image_reward import save_image_reward
    from marval_jax.programs.evaluate import image_reward_column
    from marval_jax.programs.sample import GlobalBatches
    from marval_jax.rewards.blip import ImageRewardConfig, random_params
    from marval_jax.rewards.image_reward import load_image_reward
    from marval_jax.rewards.bert_tokenizer import get_tokenizer
    from marval_jax.user_errors import UserError

    cfg = ImageRewardConfig.from_dict(TINY)
    params = random_params(cfg, 3, std=0.2)   # larger than the default 0.02: prompts then move the score visibly
    arrays = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}
    save_image_reward(str(tmp_path), cfg, arrays, vocab)
    config = _config(image_reward_checkpoint=str(tmp_path))
    layout = GlobalBatches(config.mesh)
    labels = np.array([0, 9, 4])
    assert image_reward_column(marval_rl.get_config("tiny"), layout, labels) is None   # named nowhere: no column
    with pytest.raises(UserError, match="uncond"):
        image_reward_column(config, layout, np.array([-1, -1]))
    column = image_reward_column(config, layout, labels)
    images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (4, 32, 32, 1)), jnp.float32)  # padded batch of 4
    got = column.add(layout.put(np.asarray(images)), labels)
    names = ["T-shirt/top", "Ankle boot", "Coat"]
    ids, mask = get_tokenizer(vocab)([f"a high-quality and harmonious picture of {n}" for n in names], 35)
    model = load_image_reward(str(tmp_path))
    direct = jax.jit(lambda x, i, m: model(x, i, m))(images[:3], ids, mask)
    assert got.shape == (3,)
    # two programs (a batch of 4 with per-label prompts, one of 3) of the same float32 expression: within the
    # reassociation bound of its longest chain (tests/tolerances.py): the bicubic resize 32 -> 16 (two 8-tap passes
    # and the normalisation), the ViT (8x8x3 patch conv, 2 blocks over 5 tokens, final LayerNorm), per text layer
    # self-attention over 35 tokens, cross-attention over 5 image tokens and the feed-forward block (each with its
    # LayerNorm), then the head (32 + 1024 + 128 + 64 + 16 terms) and the normalisation
    from tolerances import ULP_TRANSCENDENTAL as U, reassociation_atol, transformer_depth
    vision = 2 * 17 + 3 + 8 * 8 * 3 + 1 + transformer_depth(32, 5, 2, heads=4, mlp_ratio=2.0) + 67
    attn = lambda keys: 32 + 8 + (U + keys + 1) + keys + 32 + 1 + 67  # noqa: E731
    depth = vision + 32 + 68 + 2 * (attn(35) + attn(5) + 32 + U + 64 + 1 + 67) + 32 + 1024 + 128 + 64 + 16 + 2
    atol = reassociation_atol(depth, np.abs(direct).max())
    np.testing.assert_allclose(got, direct, rtol=0, atol=atol)
    other = jax.jit(lambda x, i, m: model(x, i, m))(images[:3], ids[::-1], mask[::-1])   # the prompts matter
    assert np.abs(np.asarray(other) - np.asarray(direct)).max() > 100 * atol
    column.add(layout.put(np.asarray(images[::-1])), labels[:2])   # a last, partial batch: 2 of 4 rows
    scores = np.concatenate([np.asarray(got), np.asarray(column.scores[1])])
    assert column.scores[1].shape == (2,)
    assert column.result() == {"image_reward": float(np.mean(scores)), "image_reward_std": float(np.std(scores))}
