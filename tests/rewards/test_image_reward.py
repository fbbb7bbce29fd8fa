"""ImageReward in Flax vs transformers' PyTorch BLIP modules (tiny random config), through the release-layout
converter: the image encoder (BlipVisionModel), the text encoder with cross-attention (BlipTextModel, bidirectional,
encoder_hidden_states = the image tokens), and the whole score against the release's formula written here on top
of those modules: (MLP(text[:, 0]) - mean) / std."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from marval_jax.checkpoints import convert_image_reward as ci
from marval_jax.rewards import blip
from marval_jax.rewards import registry as R
from marval_jax.rewards.image_reward import load_image_reward, pack_tokens
from tolerances import ULP_TRANSCENDENTAL, reassociation_atol, transformer_depth, worst_case_atol

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
torch.set_num_threads(1)

VOCAB, SEQ = 100, 12
V = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32,
         patch_size=8)
T = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
         max_position_embeddings=40, encoder_width=48)
TINY = {"vision": V, "text": T, "max_length": SEQ}
CONFIG = blip.ImageRewardConfig.from_dict(TINY)
N_IMG = (32 // 8) ** 2 + 1

# Roundings on the longest chains (tests/tolerances.py): the ViT (an 8x8x3 patch conv and the position add, two
# pre-LN blocks over 17 tokens, the final LayerNorm); the text encoder behind it (the image tokens enter every
# layer's cross-attention through a 48-term key / value projection): embeddings and their LayerNorm, then per layer
# self-attention (q, q.k, softmax over 12, x v, dense, residual + LayerNorm), cross-attention (the same over 17 image
# tokens) and the feed-forward block (dense, erf GELU, dense of 64, residual + LayerNorm); the score adds the
# head's five linears and the normalisation.
VISION_DEPTH = 8 * 8 * 3 + 1 + transformer_depth(48, N_IMG, 2, heads=4, mlp_ratio=2.0) + (2 * 48 + 3)


def _attn_depth(d, heads, keys):
    return d + d // heads + (ULP_TRANSCENDENTAL + keys + 1) + keys + d + 1 + (2 * d + 3)


TEXT_LAYER = _attn_depth(32, 4, SEQ) + _attn_depth(32, 4, N_IMG) + 32 + ULP_TRANSCENDENTAL + 64 + 1 + (2 * 32 + 3)
TEXT_DEPTH = VISION_DEPTH + 48 + 1 + (2 * 32 + 3) + 2 * TEXT_LAYER
SCORE_DEPTH = TEXT_DEPTH + 32 + 1024 + 128 + 64 + 16 + 2


# ----------------------------------------------------------------------------------------------- the reference
def _perturbed(module, seed, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return module.eval()


def _release_mlp(seed):
    """The release's head: nn.Sequential(Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear), weights
    N(0, 1/fan_in) so the score is O(1)."""
    nn = torch.nn
    mlp = nn.Sequential(nn.Linear(32, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[-1]))
    return mlp.eval()


def _hf_modules(seed=0):
    vision = transformers.BlipVisionModel(transformers.BlipVisionConfig(**V, layer_norm_eps=1e-6, hidden_act="gelu"))
    text_cfg = transformers.BlipTextConfig(**{k: v for k, v in T.items() if k != "encoder_width"},
                                           encoder_hidden_size=48, is_decoder=True, layer_norm_eps=1e-12,
                                           pad_token_id=0, bos_token_id=1, sep_token_id=3, eos_token_id=3)
    text = transformers.BlipTextModel(text_cfg, add_pooling_layer=False)
    return _perturbed(vision, seed), _perturbed(text, seed + 1), _release_mlp(seed + 2)


VISION_RENAMES = (("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
                  ("embeddings.patch_embedding", "patch_embed.proj"), ("encoder.layers.", "blocks."),
                  ("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.qkv", "attn.qkv"),
                  ("self_attn.projection", "attn.proj"), ("post_layernorm", "norm"))


def release_state_dict(vision, text, mlp) -> dict:
    """The three modules' weights under the release's keys (BLIP's timm-style ViT names, med.py's BERT names,
    `mlp.layers.N`), with the extras the release file carries: position_ids buffers and BLIP's projections."""
    sd = {}
    for k, v in vision.state_dict().items():
        for old, new in VISION_RENAMES:
            k = k.replace(old, new)
        sd[f"blip.visual_encoder.{k}"] = v
    sd.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
    sd.update({"blip.vision_proj.weight": torch.zeros(8, 48), "blip.vision_proj.bias": torch.zeros(8),
               "blip.text_proj.weight": torch.zeros(8, 32), "blip.text_proj.bias": torch.zeros(8)})
    sd.update({f"mlp.layers.{k}": v for k, v in mlp.state_dict().items()})
    return sd


def _inputs(seed=0, batch=3):
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((batch, 32, 32, 3)).astype(np.float32)  # already normalised, NHWC
    ids = rng.integers(5, VOCAB, size=(batch, SEQ))
    mask = np.zeros((batch, SEQ), np.int64)
    for row, n in enumerate((5, SEQ, 8, 3)[:batch]):   # [CLS] words [SEP], then [PAD] (0) as the release pads
        ids[row, 0], ids[row, n - 1], ids[row, n:], mask[row, :n] = 2, 3, 0, 1
    return pixels, ids, mask


def _reference(modules, pixels, ids, mask):
    vision, text, mlp = modules
    with torch.no_grad():
        image = vision(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state
        hidden = text(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                      encoder_hidden_states=image,
                      encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long)).last_hidden_state
        score = (mlp(hidden[:, 0]).squeeze(-1) - blip.SCORE_MEAN) / blip.SCORE_STD
    return image.numpy(), hidden.numpy(), score.numpy()


@pytest.fixture(scope="module")
def converted():
    """(torch modules, our module) with the same weights, through the release-layout converter."""
    modules = _hf_modules()
    arrays = ci.convert_state_dict(release_state_dict(*modules), CONFIG)
    from marval_jax.rewards.image_reward import params_from_arrays
    graphdef, _ = blip.abstract_model(CONFIG)
    return modules, nnx.merge(graphdef, params_from_arrays(CONFIG, arrays))


@jax.jit
def _forward(state, pixels, ids, mask):
    model = nnx.merge(GRAPHDEF, state)
    image = model.encode_image(pixels)
    return image, model.text_encoder(ids, mask, image), model.score(image, ids, mask)


GRAPHDEF = blip.abstract_model(CONFIG)[0]


def _check(got, ref, depth):
    atol = reassociation_atol(depth, np.abs(ref).max())
    assert atol < 1e-4 * np.abs(ref).max()      # the 1e-4 relative is implied by the derived bound
    np.testing.assert_allclose(got, ref, rtol=0, atol=atol)


# ----------------------------------------------------------------------------------------------- tests
def test_param_spec_names_every_module_parameter():
    """The converter's layout (no import of the module) and the module agree on every name and shape."""
    _, abstract = blip.abstract_model(CONFIG)
    module = {"/".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(abstract)}
    assert module == {e.path: e.shape for e in ci.param_spec(CONFIG)}
    release = blip.ImageRewardConfig()
    assert sum(int(np.prod(e.shape)) for e in ci.param_spec(release)) > 400e6   # ViT-L + BERT-base + cross-attn


def test_encoders_and_score_match_transformers(converted):
    modules, model = converted
    pixels, ids, mask = _inputs()
    image_ref, hidden_ref, score_ref = _reference(modules, pixels, ids, mask)
    image, hidden, score = _forward(nnx.state(model), jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
    _check(image, image_ref, VISION_DEPTH)
    # padded query rows are computed as well (only keys are masked): every position agrees
    _check(hidden, hidden_ref, TEXT_DEPTH)
    _check(score, score_ref, SCORE_DEPTH)
    # the images / prompts give different scores, far apart compared with the tolerance
    assert np.abs(score_ref - np.mean(score_ref)).max() > 100 * reassociation_atol(SCORE_DEPTH, np.abs(score_ref).max())


def test_padding_is_masked_and_the_image_matters(converted):
    """The [CLS] feature ignores what stands at padded positions, and reads the image through cross-attention."""
    _, model = converted
    pixels, ids, mask = _inputs(1)
    state = nnx.state(model)
    _, _, base = _forward(state, jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
    other_pad = np.where(mask == 0, 7, ids)
    _, _, padded = _forward(state, jnp.asarray(pixels), jnp.asarray(other_pad), jnp.asarray(mask))
    _check(padded, np.asarray(base), SCORE_DEPTH)
    _, _, flipped = _forward(state, jnp.asarray(pixels[::-1].copy()), jnp.asarray(ids), jnp.asarray(mask))
    assert np.abs(np.asarray(flipped) - np.asarray(base)).max() > 1e-3


def test_preprocess_matches_torch_bicubic():
    """Downsampling 64 -> 32: antialiased bicubic (Keys a = -0.5, PIL's kernel, which the release resizes with);
    as torch's interpolate(bicubic, antialias=True). Non-square: shorter side, centre crop; grey -> RGB."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    got = np.asarray(blip.preprocess(jnp.asarray(x), 32))
    ref = torch.nn.functional.interpolate(torch.from_numpy((x + 1) / 2).permute(0, 3, 1, 2), size=(32, 32),
                                          mode="bicubic", antialias=True, align_corners=False)
    ref = (ref.permute(0, 2, 3, 1).numpy() - np.array(blip.OPENAI_CLIP_MEAN)) / np.array(blip.OPENAI_CLIP_STD)
    # separable 8-tap filters per axis (two passes) with weights normalised by their sum, then the affine
    # normalisation: at most 2 * (8 + 8 + 1) + 3 roundings each, worst case on the scale max|ref|
    np.testing.assert_allclose(got, ref, rtol=0, atol=worst_case_atol(2 * 17 + 3, np.abs(ref).max()))
    assert blip.preprocess(jnp.zeros((1, 16, 40, 3)), 32).shape == (1, 32, 32, 3)
    grey = rng.uniform(-1, 1, (1, 32, 32, 1)).astype(np.float32)
    np.testing.assert_array_equal(blip.preprocess(jnp.asarray(grey), 32),
                                  blip.preprocess(jnp.asarray(np.repeat(grey, 3, -1)), 32))
    with pytest.raises(ValueError, match="NHWC"):
        blip.preprocess(jnp.zeros((1, 3, 32, 32)), 32)


def test_reward_from_checkpoint_scores_and_gradients(converted, tmp_path):
    """make_reward("image_reward", checkpoint) = the module on preprocessed images, per label's prompt tokens; the
    reward is differentiable w.r.t. the generated pixels."""
    modules, _ = converted
    ci.save_image_reward(str(tmp_path), CONFIG, ci.convert_state_dict(release_state_dict(*modules), CONFIG))
    reward = R.make_reward("image_reward", {"checkpoint": str(tmp_path)})
    pixels, ids, mask = _inputs(2)
    images = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (4, 48, 48, 3)), jnp.float32)
    labels = jnp.array([2, 0, 1, 2])
    tokens = pack_tokens(ids, mask)
    score = jax.jit(reward.fn)(reward.params, images, labels, tokens)
    model = load_image_reward(str(tmp_path))
    direct = jax.jit(lambda x, i, m: model(x, i, m))(images, ids[np.asarray(labels)], mask[np.asarray(labels)])
    np.testing.assert_array_equal(score, direct)   # the same program over the same inputs
    g = jax.jit(jax.grad(lambda x: reward(reward.params, x, labels, tokens).sum()))(images)
    assert g.shape == images.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
    one = reward.prepare(reward.params, ids[:1])   # int ids: the mask is ids != [PAD]
    np.testing.assert_array_equal(one, pack_tokens(ids[:1], mask[:1]))
    assert jax.eval_shape(reward.bind(prompt_embeddings=one), images).shape == (4,)   # one prompt, broadcast


def test_reward_input_errors(tmp_path):
    from marval_jax.user_errors import UserError
    with pytest.raises(UserError, match="checkpoint"):
        R.make_reward("image_reward", {})
    with pytest.raises(FileNotFoundError, match="config.json"):
        R.make_reward("image_reward", {"checkpoint": str(tmp_path / "missing")})
    reward = R.make_reward("image_reward", {"image_reward_config": TINY})
    with pytest.raises(UserError, match="vocabulary"):
        reward.prepare(reward.params, ["a cat"])
    with pytest.raises(UserError, match="outside the text vocabulary"):
        reward.prepare(reward.params, np.array([[2, VOCAB, 3]]))
    with pytest.raises(UserError, match="T<=12"):
        reward.prepare(reward.params, np.zeros((1, 13), np.int64))
    with pytest.raises(ValueError, match="needs prompt_embeddings"):
        reward(reward.params, jnp.zeros((2, 32, 32, 3)))
    with pytest.raises(UserError, match="encoder_width"):
        blip.ImageRewardConfig.from_dict({"vision": V, "text": {**T, "encoder_width": 32}})
    with pytest.raises(UserError, match="unknown fields"):
        blip.ImageRewardConfig.from_dict({"text": {"hidden": 3}})


def test_registered_by_name_in_a_fresh_process():
    """make_reward imports marval_jax.rewards.image_reward itself (KNOWN_REWARD_MODULES): rl.reward=image_reward
    works from the command line, where nothing imported the module before."""
    import os
    import subprocess
    import sys
    code = ("import sys; from marval_jax.rewards import registry as R; "
            "assert 'marval_jax.rewards.image_reward' not in sys.modules; "
            "assert 'image_reward' in R.available_rewards()")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
