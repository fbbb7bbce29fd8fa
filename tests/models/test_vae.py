"""marval_jax/models/vae.py: parity with the PyTorch reference (fixture), posterior semantics, input checks."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from marval_jax.checkpoints.convert_vae import build_vae
from marval_jax.models import vae as vae_lib
from tolerances import (EPS32, ULP_TRANSCENDENTAL, assert_close_to_scale, max_abs,
                        reassociation_atol, vae_depth)

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "mar_reference_tiny.npz"


def _nhwc(a):
    return np.transpose(np.asarray(a, np.float32), (0, 2, 3, 1))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files if k.startswith(("vae_", "config_json"))}


@pytest.fixture(scope="module")
def ref_vae(ref):
    import json
    cfg = json.loads(str(ref["config_json"]))
    sd = {k[len("vae_param/"):]: v for k, v in ref.items() if k.startswith("vae_param/")}
    vae = build_vae(sd, ch=cfg["vae_ch"], ch_mult=tuple(cfg["vae_ch_mult"]), embed_dim=16)
    graphdef, state = nnx.split(vae)
    encode = jax.jit(lambda st, x: nnx.merge(graphdef, st).encode(x))
    decode = jax.jit(lambda st, z: nnx.merge(graphdef, st).decode(z))
    return vae, (lambda x: encode(state, x)), (lambda z: decode(state, z))


def _random_vae(**kw):
    """(graphdef, state) of a VAE with random weights, without nnx's (slow, eager) initialisers."""
    abstract = nnx.eval_shape(lambda: vae_lib.AutoencoderKL(**kw))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    pure = jax.tree.map(lambda s: (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]) or 1)).astype(np.float32),
                        nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return graphdef, state


@pytest.fixture(scope="module")
def small_vae():
    # 2 levels (stride 2), 8 px.
    graphdef, state = _random_vae(ch=32, ch_mult=(1, 2), embed_dim=4, attn_levels=(1,))
    return nnx.merge(graphdef, state)


def test_encode_matches_reference(ref, ref_vae):
    _, encode, _ = ref_vae
    post = encode(_nhwc(ref["vae_io/image"]))
    assert post.mean.dtype == jnp.float32
    # torch vs XLA: the encoder's chain to the reassociation bound (tests/tolerances.py), on the output's scale
    tol = reassociation_atol(vae_depth(32, (1, 1, 2, 2, 4), 64), 1.0)
    assert _rel(post.mean, _nhwc(ref["vae_io/post_mean"])) < tol
    assert _rel(post.logvar, _nhwc(ref["vae_io/post_logvar"])) < tol
    # moments are the raw mean || logvar, as MAR's latent cache stores them.
    e = post.mean.shape[-1]
    np.testing.assert_array_equal(post.moments[..., :e], post.mean)
    np.testing.assert_array_equal(np.clip(post.moments[..., e:], -30, 20), post.logvar)


def test_decode_matches_reference(ref, ref_vae):
    _, _, decode = ref_vae
    out = decode(_nhwc(ref["vae_io/z"]))
    assert out.dtype == jnp.float32
    tol = reassociation_atol(vae_depth(32, (1, 1, 2, 2, 4), 64, decoder=True), 1.0)  # as the encoder's
    assert _rel(out, _nhwc(ref["vae_io/decoded"])) < tol


def test_default_config_is_kl16():
    # Reference [run]: 66,456,019 parameters in 312 tensors; attention on the last encoder level only.
    vae = nnx.eval_shape(lambda: vae_lib.AutoencoderKL())
    leaves = jax.tree.leaves(nnx.state(vae, nnx.Param))
    assert len(leaves) == 312
    assert sum(int(np.prod(x.shape)) for x in leaves) == 66_456_019
    assert vae.attn_levels == (4,) and vae.stride == 16
    assert [len(level.attn) for level in vae.encoder.down] == [0, 0, 0, 0, 2]
    assert [len(level.block) for level in vae.decoder.up] == [3] * 5
    assert not any(hasattr(level, "attn") for level in vae.decoder.up)
    assert vae.encoder.down[4].downsample is None and vae.decoder.up[0].upsample is None


def test_posterior_semantics():
    moments = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 8)).astype(np.float32))
    moments = moments.at[0, 0, 0, 4].set(50.0).at[0, 0, 0, 5].set(-50.0)
    post = vae_lib.DiagonalGaussian.from_moments(moments)
    np.testing.assert_array_equal(post.moments, moments)  # raw, not clamped
    assert float(post.logvar[0, 0, 0, 0]) == 20.0 and float(post.logvar[0, 0, 0, 1]) == -30.0
    # XLA's exp vs NumPy's: each within ULP_TRANSCENDENTAL ulps, after an exact halving
    np.testing.assert_allclose(post.std, np.exp(0.5 * np.asarray(post.logvar)), rtol=2 * ULP_TRANSCENDENTAL * EPS32)
    np.testing.assert_array_equal(post.mode(), moments[..., :4])
    rng = jax.random.key(3)
    s = post.sample(rng)
    noise = post.std * jax.random.normal(rng, post.mean.shape)
    # mean + std * noise with or without FMA: 2 roundings on the terms' scale (an element may cancel to ~0)
    assert_close_to_scale(s, post.mean + noise, 2, scale=max_abs(post.mean) + max_abs(noise))
    np.testing.assert_array_equal(s, post.sample(rng))
    assert not np.allclose(s, post.sample(jax.random.key(4)))
    # Statistics of many samples.
    big = vae_lib.DiagonalGaussian.from_moments(jnp.tile(jnp.array([1.0, -2.0, np.log(0.25), 0.0]), (20000, 1)))
    x = np.asarray(big.sample(jax.random.key(0)))
    # statistical, fixed key: standard errors sigma/sqrt(n) = 0.007 (mean), sigma/sqrt(2n) = 0.005 (std): 4 sigma
    np.testing.assert_allclose(x.mean(0), [1.0, -2.0], atol=0.02)
    np.testing.assert_allclose(x.std(0), [0.5, 1.0], atol=0.02)
    np.testing.assert_allclose(vae_lib.DiagonalGaussian.from_moments(jnp.zeros((1, 2, 2, 4))).kl(), [0.0])


def test_scale_helpers(small_vae):
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32))
    rng = jax.random.key(0)
    graphdef, state = nnx.split(small_vae)

    @jax.jit
    def run(state, x, rng):
        vae = nnx.merge(graphdef, state)
        post = vae.encode(x)
        lat = vae_lib.latents_from_images(vae, x)
        return dict(post=post, lat=lat, lat_rng=vae_lib.latents_from_images(vae, x, rng),
                    lat_moments=vae_lib.latents_from_moments(post.moments, rng),
                    img=vae_lib.images_from_latents(vae, lat), img_ref=vae.decode(lat / 0.2325))

    out = run(state, x, rng)
    post = out["post"]
    assert post.mean.shape == (1, 4, 4, 4) and out["img"].shape == (1, 8, 8, 3)
    # the helpers re-run the encoder / decoder inside one jit, the references are separate ops (eager multiply,
    # another fusion): the small VAE's chains to the reassociation bound, on each output's scale
    enc, dec = vae_depth(32, (1, 2), 8, decoder=False) + 1, vae_depth(32, (1, 2), 8, decoder=True) + 1
    assert_close_to_scale(out["lat"], post.mode() * 0.2325, enc)
    assert_close_to_scale(out["lat_rng"], post.sample(rng) * vae_lib.VAE_SCALE, enc + 2)
    assert_close_to_scale(out["lat_moments"], post.sample(rng) * 0.2325, enc + 2)
    assert_close_to_scale(out["img"], out["img_ref"], dec)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    graphdef, state = _random_vae(ch=32, ch_mult=(1,), embed_dim=4, attn_levels=(0,), dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state))

    @jax.jit
    def run(state, x):
        vae = nnx.merge(graphdef, state)
        mean = vae.encode(x).mean
        return mean, vae.decode(mean)

    mean, img = run(state, jnp.zeros((1, 4, 4, 3)))
    assert mean.dtype == jnp.float32 and img.dtype == jnp.float32 and img.shape == (1, 4, 4, 3)


def test_wrong_input_shapes_raise(small_vae):
    with pytest.raises(ValueError, match=r"NHWC.*\(1, 3, 8, 8\)"):
        small_vae.encode(jnp.zeros((1, 3, 8, 8)))  # NCHW by mistake
    with pytest.raises(ValueError, match="multiples of 2"):
        small_vae.encode(jnp.zeros((1, 7, 8, 3)))
    with pytest.raises(ValueError, match=r"\(B, h, w, 4\).*\(1, 4, 4, 3\)"):
        small_vae.decode(jnp.zeros((1, 4, 4, 3)))
    with pytest.raises(ValueError, match="even channel"):
        vae_lib.DiagonalGaussian.from_moments(jnp.zeros((1, 2, 2, 3)))
