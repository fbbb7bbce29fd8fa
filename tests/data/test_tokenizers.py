import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marval_jax.data import tokenizers as tk
from tolerances import ULP_TRANSCENDENTAL, assert_close_to_scale


def mar_patchify(x_nchw: np.ndarray, p: int) -> np.ndarray:
    """MAR's ``patchify`` (models/mar.py) in NumPy on NCHW input."""
    b, c, hh, ww = x_nchw.shape
    h, w = hh // p, ww // p
    x = x_nchw.reshape(b, c, h, p, w, p)
    x = np.einsum("nchpwq->nhwcpq", x)
    return x.reshape(b, h * w, c * p * p)


@pytest.mark.parametrize("p,c,h,w", [(1, 3, 4, 6), (2, 1, 32, 32), (4, 3, 8, 12), (2, 16, 4, 4)])
def test_patch_order_matches_mar_and_round_trip(p, c, h, w):
    x = np.random.default_rng(0).uniform(-1, 1, (2, h, w, c)).astype(np.float32)
    tok = tk.PixelPatchTokenizer(p, c, h, w)
    tokens = tok.encode(jnp.asarray(x))
    assert tokens.shape == (2, tok.seq_len, tok.token_dim) == (2, (h // p) * (w // p), c * p * p)
    np.testing.assert_array_equal(np.asarray(tokens), mar_patchify(x.transpose(0, 3, 1, 2), p))
    np.testing.assert_array_equal(tk.patchify_np(x, p), np.asarray(tokens))
    np.testing.assert_array_equal(tk.patchify_np(x[0], p), np.asarray(tokens[0]))
    np.testing.assert_array_equal(np.asarray(tok.decode(tokens)), x)


def test_tokens_match_recorded_mar_fixture(ref):
    d = ref
    x = d["io/x"]  # (3, 16, 4, 4) NCHW latents, patch_size 1
    tok = tk.PixelPatchTokenizer(1, 16, 4, 4)
    np.testing.assert_array_equal(np.asarray(tok.encode(x.transpose(0, 2, 3, 1))), d["io/tokens"])
    np.testing.assert_array_equal(np.asarray(tok.decode(d["io/tokens"])).transpose(0, 3, 1, 2), d["io/unpatchified"])


def test_encode_is_differentiable_and_jittable():
    tok = tk.PixelPatchTokenizer(2, 3, 4, 4)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 4, 3)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(2).normal(size=(1, 4, 12)), jnp.float32)
    g = jax.grad(lambda x: jnp.sum(tok.encode(x) * w))(x)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(tok.decode(w)))  # encode is a permutation
    np.testing.assert_array_equal(np.asarray(jax.jit(tok.encode)(x)), np.asarray(tok.encode(x)))
    assert isinstance(tok, tk.Tokenizer)


def test_bad_shapes_fail_clearly():
    with pytest.raises(ValueError, match="multiples of patch_size"):
        tk.PixelPatchTokenizer(3, 1, 32, 32)
    tok = tk.PixelPatchTokenizer(2, 1, 32, 32)
    with pytest.raises(ValueError, match=r"\(B, 32, 32, 1\)"):
        tok.encode(jnp.zeros((2, 32, 32, 3)))
    with pytest.raises(ValueError, match="expected tokens"):
        tok.decode(jnp.zeros((2, 10, 4)))


def _linear_vae(c_img=3, c_lat=4, s=4, seed=0):
    """Stand-in VAE: moments = patchify(x, s) @ A (raw mean || logvar); decode = least-squares inverse."""
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.normal(size=(c_img * s * s, 2 * c_lat)) / 8, jnp.float32)
    pinv = jnp.linalg.pinv(a[:, :c_lat])

    def encode_fn(x):
        b, hh, ww, _ = x.shape
        return (tk.patchify(x, s) @ a).reshape(b, hh // s, ww // s, 2 * c_lat)

    def decode_fn(z):
        b, h, w, _ = z.shape
        return tk.unpatchify(z.reshape(b, h * w, c_lat) @ pinv, s, h * s, w * s, c_img)

    return encode_fn, decode_fn


def test_vae_tokenizer_mode_sample_and_shapes():
    encode_fn, decode_fn = _linear_vae()
    tok = tk.VAETokenizer(encode_fn, decode_fn, latent_channels=4, stride=4, height=16, width=16, patch_size=2)
    assert (tok.seq_len, tok.token_dim) == (4, 16)
    x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    moments = encode_fn(x)
    mean, logvar = moments[..., :4], jnp.clip(moments[..., 4:], -30, 20)
    # tok.encode and this are other programs over the linear VAE's 48-term matmul and the scale: the float32 bound
    # of that chain on the values' scale (tests/tolerances.py), as in the two comparisons below
    assert_close_to_scale(np.asarray(tok.encode(x)), np.asarray(tk.patchify(mean * 0.2325, 2)), 48 + 2)
    # a (mean, logvar) pair from encode_fn works the same
    tok2 = tk.VAETokenizer(lambda x: (encode_fn(x)[..., :4], encode_fn(x)[..., 4:]), decode_fn, latent_channels=4,
                           stride=4, height=16, width=16, patch_size=2)
    rng = jax.random.key(0)
    np.testing.assert_array_equal(np.asarray(tok.encode(x, rng)), np.asarray(tok2.encode(x, rng)))
    eps = jax.random.normal(rng, mean.shape)
    expected = (mean + jnp.exp(0.5 * logvar) * eps) * 0.2325
    assert_close_to_scale(np.asarray(tok.encode(x, rng)), np.asarray(tk.patchify(expected, 2)),
                          48 + 4 + ULP_TRANSCENDENTAL)  # + clip, exp, multiply, add, scale
    # decode divides by the scale before the VAE decoder
    assert_close_to_scale(np.asarray(tok.decode(tok.encode(x))), np.asarray(decode_fn(mean)),
                          48 + 2 + 4)  # encode, scale and unscale, the 4-term pinv matmul
    with pytest.raises(ValueError, match="moments"):
        tk.VAETokenizer(lambda x: encode_fn(x)[..., :4], decode_fn, latent_channels=4, stride=4, height=16,
                        width=16).encode(x)
