"""Flax CLIP vs transformers' PyTorch CLIPModel (tiny random config), through convert_clip."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from marval_jax.checkpoints import convert_clip as cc
from marval_jax.models import clip as C
from marval_jax.rewards.clip import clip_score, pickscore
from tolerances import clip_depth, reassociation_atol, worst_case_atol

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
torch.set_num_threads(1)

VOCAB = 1000


def _hf_config(legacy_eos: bool = False):
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, hidden_act="quick_gelu", bos_token_id=VOCAB - 2,
                eos_token_id=2 if legacy_eos else VOCAB - 1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, hidden_act="gelu")
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


@functools.lru_cache(maxsize=None)
def _hf_model(legacy_eos=False, seed=0):
    torch.manual_seed(seed)
    model = transformers.CLIPModel(_hf_config(legacy_eos)).eval()
    with torch.no_grad():  # perturb every parameter (LayerNorms start at 1/0, logit_scale at a constant)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _features(out):
    return (out if torch.is_tensor(out) else out.pooler_output).detach().numpy()


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((3, 32, 32, 3)).astype(np.float32)  # already normalised, NHWC
    ids = rng.integers(3, VOCAB - 2, size=(3, 16))
    ids[:, 0] = VOCAB - 2
    for row, eos_at in enumerate((5, 15, 9)):  # EOS then zero padding, as our tokenizer
        ids[row, eos_at] = VOCAB - 1
        ids[row, eos_at + 1:] = 0
    return pixels, ids


def _reference(model, pixels, ids):
    with torch.no_grad():
        img = _features(model.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))))
        txt = _features(model.get_text_features(input_ids=torch.from_numpy(ids)))
        logits = model(input_ids=torch.from_numpy(ids),
                       pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).logits_per_image.numpy()
    return img, txt, logits


# _hf_config's towers: vision 32 wide, 2 layers, 4 heads, (32/8)^2 + 1 tokens, an 8x8x3 patch conv; text the same
# widths over 16 tokens. Torch vs XLA are two programs: each output within the float32 bound of its chain on the
# scale max|ref| (tests/tolerances.py); a score combines both towers' chains (their errors add).
IMG_DEPTH = clip_depth(32, 64, 2, 4, 17, 8 * 8 * 3, 16)
TXT_DEPTH = clip_depth(32, 64, 2, 4, 16, 1, 16)
IMG_TOL, TXT_TOL = reassociation_atol(IMG_DEPTH, 1.0), reassociation_atol(TXT_DEPTH, 1.0)
SCORE_TOL = reassociation_atol(IMG_DEPTH + TXT_DEPTH + 3 * 16 + 3 * 4 + 6, 1.0)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def _ours(model_hf):
    config = C.CLIPConfig.from_hf_dict(model_hf.config.to_dict())
    params = cc.convert_state_dict(model_hf.state_dict(), config)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: C.init_clip(config)))
    return config, nnx.merge(graphdef, params)


def _embed(model, pixels, ids):
    """encode_image / encode_text under one jit (split at the boundary, merged inside)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, pixels, ids):
        m = nnx.merge(graphdef, state)
        return m.encode_image(pixels), m.encode_text(ids), m.logit_scale[...]

    return f(state, jnp.asarray(pixels), jnp.asarray(ids))


@pytest.mark.parametrize("legacy_eos", [False, True])
def test_matches_transformers(legacy_eos):
    model_hf = _hf_model(legacy_eos)
    pixels, ids = _inputs()
    if legacy_eos:  # argmax pooling: EOS must be the largest id
        ids = np.where(ids == VOCAB - 2, VOCAB - 3, ids)
    img_ref, txt_ref, logits_ref = _reference(model_hf, pixels, ids)
    config, model = _ours(model_hf)
    assert config.text.eos_token_id == (2 if legacy_eos else VOCAB - 1)
    assert config.text.hidden_act == "quick_gelu" and config.vision.hidden_act == "gelu"

    img, txt, logit_scale = _embed(model, pixels, ids)
    assert _rel(img, img_ref) < IMG_TOL, _rel(img, img_ref)
    assert _rel(txt, txt_ref) < TXT_TOL, _rel(txt, txt_ref)
    # PickScore = HF's logits_per_image (diagonal: matched pairs; the cross terms via broadcasting)
    ps = pickscore(img[:, None], txt[None], logit_scale)
    assert _rel(ps, logits_ref) < SCORE_TOL
    cs_ref = 100 * np.diag(logits_ref) / np.exp(float(logit_scale))
    assert _rel(clip_score(img, txt, clamp_min=None), cs_ref) < SCORE_TOL


def test_jit_split_merge_and_bf16():
    model_hf = _hf_model()
    pixels, ids = _inputs(1)
    img_ref, txt_ref, _ = _reference(model_hf, pixels, ids)
    config, model = _ours(model_hf)
    img, txt, _ = _embed(model, pixels, ids)
    assert _rel(img, img_ref) < IMG_TOL and _rel(txt, txt_ref) < TXT_TOL
    _, state = nnx.split(model)
    bf16_graph, _ = nnx.split(nnx.eval_shape(lambda: C.CLIP(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)))
    m16 = nnx.merge(bf16_graph, state)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m16)))
    img16, txt16, _ = _embed(m16, pixels, ids)
    assert img16.dtype == jnp.float32 and _rel(img16, img_ref) < 5e-2 and _rel(txt16, txt_ref) < 5e-2


def test_save_pretrained_roundtrip_and_cli(tmp_path):
    model_hf = _hf_model(seed=3)
    pixels, ids = _inputs(2)
    img_ref, txt_ref, _ = _reference(model_hf, pixels, ids)
    hf_dir, out_dir = tmp_path / "hf", tmp_path / "jax"
    model_hf.save_pretrained(str(hf_dir), safe_serialization=True)
    assert (hf_dir / "model.safetensors").is_file()
    (hf_dir / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    cc.main(["--hf-dir", str(hf_dir), "--out", str(out_dir)])
    model = cc.load_clip(str(out_dir))
    assert model.config.image_mean == (0.5, 0.5, 0.5) and model.config.image_std == (0.25, 0.25, 0.25)
    img, txt, _ = _embed(model, pixels, ids)
    assert _rel(img, img_ref) < IMG_TOL and _rel(txt, txt_ref) < TXT_TOL


def test_strict_conversion_lists_all_problems():
    model_hf = _hf_model()
    config = C.CLIPConfig.from_hf_dict(model_hf.config.to_dict())
    sd = dict(model_hf.state_dict())
    sd["text_model.embeddings.position_ids"] = torch.arange(16)[None]  # old checkpoints: ignored
    del sd["vision_model.post_layernorm.bias"]
    sd["text_model.extra.weight"] = torch.zeros(3)
    sd["visual_projection.weight"] = torch.zeros(8, 32)
    with pytest.raises(ValueError) as e:
        cc.convert_state_dict(sd, config)
    msg = str(e.value)
    assert "missing: vision_model.post_layernorm.bias" in msg
    assert "unexpected: text_model.extra.weight" in msg
    assert "mis-shaped: visual_projection.weight" in msg
    assert "position_ids" not in msg


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        cc.load_clip(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no weights"):
        cc.read_hf_state_dict(str(tmp_path))


def test_preprocess():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    # same size: only the affine normalisation
    expected = ((x + 1) / 2 - np.array(C.OPENAI_CLIP_MEAN)) / np.array(C.OPENAI_CLIP_STD)
    np.testing.assert_allclose(C.preprocess(jnp.asarray(x), 32), expected, rtol=1e-5, atol=1e-5)
    # downsampling by 2 with antialiasing == 2x2 box average, as torch's antialiased bilinear
    y = np.asarray(C.preprocess(jnp.asarray(x), 16))
    ref = torch.nn.functional.interpolate(torch.from_numpy((x + 1) / 2).permute(0, 3, 1, 2), size=(16, 16),
                                          mode="bilinear", antialias=True, align_corners=False)
    ref = (ref.permute(0, 2, 3, 1).numpy() - np.array(C.OPENAI_CLIP_MEAN)) / np.array(C.OPENAI_CLIP_STD)
    # separable 2-tap-per-axis filters over 4 terms, weights normalised by their sum in each library, then the
    # affine normalisation: at most 16 roundings each, worst case on the scale max|ref|
    np.testing.assert_allclose(y, ref, rtol=0, atol=worst_case_atol(16, np.abs(ref).max()))
    # non-square: shorter side to size, centre crop
    assert C.preprocess(jnp.zeros((1, 16, 40, 3)), 32).shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="NHWC"):
        C.preprocess(jnp.zeros((1, 3, 32, 32)), 32)


def test_gradient_through_preprocess_and_image_tower():
    model_hf = _hf_model()
    _, model = _ours(model_hf)
    graphdef, state = nnx.split(model)
    txt = _embed(model, *_inputs())[1]

    @jax.jit
    @jax.grad
    def score(images):
        m = nnx.merge(graphdef, state)
        return clip_score(m.embed_images(images), txt, clamp_min=None).sum()

    g = score(jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 48, 48, 3)), jnp.float32))
    assert g.shape == (3, 48, 48, 3) and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


def test_config_validation():
    with pytest.raises(ValueError, match="hidden_act"):
        C.CLIPConfig.from_hf_dict({"text_config": {"hidden_act": "swish"}})
    cfg = C.CLIPConfig.from_hf_dict({"vision_config": {"image_size": [64, 64]}, "projection_dim": 8})
    assert cfg.vision.image_size == 64 and cfg.projection_dim == 8 and cfg.text.vocab_size == 49408
    assert C.CLIPConfig.from_hf_dict(cfg.to_dict()) == cfg
    model = nnx.eval_shape(lambda: C.init_clip(C.CLIPConfig.from_hf_dict(_hf_config().to_dict())))
    with pytest.raises(ValueError, match="expected \\(B, 32, 32, 3\\)"):
        model.encode_image(jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="T<=16"):
        model.encode_text(jnp.zeros((1, 17), jnp.int32))
