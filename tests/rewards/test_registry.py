"""Reward registry: lookup errors, registration, and the CLIP rewards against direct CLIP computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from marval_jax.checkpoints.convert_clip import save_clip
from marval_jax.models import clip as C
from marval_jax.rewards import registry as R
from tolerances import assert_close_to_scale, clip_depth

TINY = {
    "text_config": dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=77),
    "vision_config": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=16, patch_size=8, hidden_act="gelu"),
    "projection_dim": 8,
}
# The rewards and _direct are other programs over the same float32 expressions: TINY's towers (width 16, one
# layer, 2 heads; vision 5 tokens after an 8x8x3 patch conv, text 77 tokens), the score's cosine after them, and
# the antialiased resize in front (16 roundings): each result within the float32 bound of its chain on its scale
# (tests/tolerances.py).
TXT_DEPTH = clip_depth(16, 32, 1, 2, 77, 1, 8)
SCORE_DEPTH = 16 + clip_depth(16, 32, 1, 2, 5, 8 * 8 * 3, 8) + clip_depth(16, 32, 1, 2, 77, 1, 8, score=True)

PROMPTS = ["a photo of a cat", "a red sports car", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def clip_reward():
    return R.make_reward("clip_score", {"clip_config": TINY, "seed": 1, "clamp_min": None})


def _direct(params, images):
    """Reference: the CLIP module called directly, its tokenizer and closed-form scores (no registry)."""
    config = C.CLIPConfig.from_hf_dict(TINY)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: C.init_clip(config)))
    from marval_jax.rewards.clip_tokenizer import tokenize

    @jax.jit
    def f(params, images, ids):
        model = nnx.merge(graphdef, params)
        return model.embed_images(images), model.encode_text(ids), model.logit_scale[...]

    img, txt, scale = f(params, images, jnp.asarray(tokenize(PROMPTS)))
    return np.asarray(img), np.asarray(txt), float(scale)


def _cos(a, b):
    return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_unknown_reward_lists_registered():
    assert {"clip_score", "pickscore"} <= set(R.available_rewards())
    with pytest.raises(ValueError, match="unknown reward 'nope'.*clip_score"):
        R.make_reward("nope", {})


def test_register_custom_reward_and_duplicates(monkeypatch):
    monkeypatch.setattr(R, "_REGISTRY", dict(R._REGISTRY))

    @R.register_reward("mean_brightness")
    def build(config):
        return R.Reward("mean_brightness", lambda params, images, labels, emb: params * images.mean(axis=(1, 2, 3)),
                        params=jnp.float32(R.config_get(config, "weight", 1.0)))

    reward = R.make_reward("mean_brightness", {"weight": 2.0})
    images = jnp.ones((2, 4, 4, 3)) * 0.5
    np.testing.assert_allclose(reward(reward.params, images), [1.0, 1.0])
    assert reward.prepare(reward.params, ["x"]) is None
    with pytest.raises(ValueError, match="already registered"):
        R.register_reward("mean_brightness")(lambda config: None)
    R.register_reward("bad")(lambda config: 3)
    with pytest.raises(TypeError, match="expected Reward"):
        R.make_reward("bad")


def test_lazy_import_of_known_modules(monkeypatch):
    monkeypatch.setattr(R, "KNOWN_REWARD_MODULES", ("marval_jax.rewards.does_not_exist_yet",))
    with pytest.raises(ValueError, match="unknown reward"):  # absent module: skipped, then a clear error
        R.make_reward("classifier_v0", {})


def test_clip_score_reward(clip_reward):
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (4, 24, 24, 3)), jnp.float32)
    labels = jnp.array([2, 0, 1, 2])
    emb = clip_reward.prepare(clip_reward.params, PROMPTS)
    assert emb.shape == (3, 8)
    img, txt, _ = _direct(clip_reward.params, images)
    assert_close_to_scale(emb, txt, TXT_DEPTH)

    score = jax.jit(clip_reward.fn)(clip_reward.params, images, labels, emb)
    assert_close_to_scale(score, 100 * _cos(img, txt[np.asarray(labels)]), SCORE_DEPTH)
    # differentiable w.r.t. the images
    g = jax.jit(jax.grad(lambda x: clip_reward(clip_reward.params, x, labels, emb).sum()))(images)
    assert g.shape == images.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
    # default clamps at 0
    clamped = R.make_reward("clip_score", {"clip_config": TINY, "seed": 1})
    assert_close_to_scale(clamped(clamped.params, images, labels, emb), np.maximum(np.asarray(score), 0),
                          SCORE_DEPTH, scale=float(np.abs(score).max()))


def test_pickscore_reward_from_checkpoint(clip_reward, tmp_path):
    save_clip(str(tmp_path), C.CLIPConfig.from_hf_dict(TINY), clip_reward.params)
    reward = R.make_reward("pickscore", {"checkpoint": str(tmp_path)})
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.uniform(-1, 1, (3, 16, 16, 3)), jnp.float32)
    emb = reward.prepare(reward.params, PROMPTS)
    img, txt, logit_scale = _direct(clip_reward.params, images)
    expected = np.exp(logit_scale) * _cos(img, txt)
    assert_close_to_scale(jax.jit(reward.fn)(reward.params, images, None, emb), expected, SCORE_DEPTH)
    one = reward.prepare(reward.params, "a photo of a cat")  # one prompt broadcast over the batch
    bound = jax.jit(reward.bind(prompt_embeddings=one))  # (images, labels) -> (B,), as losses.rl expects
    assert_close_to_scale(bound(images, None), np.exp(logit_scale) * _cos(img, txt[:1]), SCORE_DEPTH)


def test_reward_input_errors(clip_reward, tmp_path):
    images = jnp.zeros((2, 16, 16, 3))
    emb = jnp.zeros((3, 8))
    with pytest.raises(ValueError, match="needs prompt_embeddings"):
        clip_reward(clip_reward.params, images)
    with pytest.raises(ValueError, match="1 or 2 rows"):
        clip_reward(clip_reward.params, images, None, emb)
    with pytest.raises(ValueError, match="labels must be"):
        clip_reward(clip_reward.params, images, jnp.zeros((3,), jnp.int32), emb)
    with pytest.raises(ValueError, match="checkpoint"):
        R.make_reward("pickscore", {})
    with pytest.raises(FileNotFoundError, match="config.json"):
        R.make_reward("pickscore", {"checkpoint": str(tmp_path / "missing")})
    small = R.make_reward("clip_score", {"clip_config": {**TINY, "text_config": {**TINY["text_config"],
                                                                                  "vocab_size": 100}}})
    with pytest.raises(ValueError, match="outside the text vocabulary"):
        small.prepare(small.params, PROMPTS)
