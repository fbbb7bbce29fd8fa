"""kernels/flash_attention: the fused attention-with-dropout kernel against its materialising reference.

Off GPU the Pallas kernels run in interpret mode on tiny shapes: T = 20 queries and L = 20 or 13 keys with blocks of 8
(so the query and key padding, and the masking of padded keys, are exercised), hd = 16. The reference is
`flash_attention_reference`: transformer.attention_core's "xla" computation with the kernel's dropout mask, so with
the same seed the two compute the same expression and differ only by rounding. On a GPU the compiled Triton kernel
also runs at MAR-B's attention shape.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marval_jax.kernels import flash_attention as fa
from tolerances import EPS16, ULP_TRANSCENDENTAL, assert_close_to_scale, assert_trees_close, max_abs

ON_GPU = jax.default_backend() == "gpu"
B, H, HD = 2, 2, 16


def _qkv(t=20, length=20, hd=HD, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, t, H, hd), dtype), jax.random.normal(ks[1], (B, length, H, hd), dtype),
            jax.random.normal(ks[2], (B, length, H, hd), dtype))


def _fwd_depth(length, hd):
    """Roundings on the longest chain of one attention output: q.k (hd terms), the hd^-0.5 scale, the max
    subtraction, exp, the row sum (L terms), the division, the dropout scale and p.v (L terms)."""
    return hd + 2 * length + ULP_TRANSCENDENTAL + 4


def _fwd_scale(q, k, v):
    """Terms of the output are p * v, and a logit error delta moves p by delta * p: the output's errors scale with
    max|v| times (1 + the largest |logit|)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    return max_abs(v) * (1.0 + max_abs(logits))


@functools.partial(jax.jit, static_argnames=("rate", "block_q", "block_k"))
def _flash(q, k, v, seed, rate, block_q=8, block_k=8):
    return fa.flash_attention(q, k, v, dropout_rate=rate, seed=seed, block_q=block_q, block_k=block_k,
                              interpret=True)


@functools.partial(jax.jit, static_argnames=("rate",))
def _reference(q, k, v, seed, rate):
    return fa.flash_attention_reference(q, k, v, dropout_rate=rate, seed=seed)


@pytest.mark.parametrize("length, block_k", [(20, 8), (13, 16)])
def test_forward_without_dropout_matches_the_reference(length, block_k):
    q, k, v = _qkv(length=length)
    out = _flash(q, k, v, None, 0.0, block_k=block_k)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close_to_scale(out, _reference(q, k, v, None, 0.0), _fwd_depth(length, HD), scale=_fwd_scale(q, k, v))


def test_forward_bf16_is_within_bf16_rounding_of_the_reference():
    """Both sides compute the same float32 logits and probabilities; they differ in where the probabilities are
    rounded to bf16 for p.v (the reference rounds the normalised p, the kernel the unnormalised exp(s - max), each
    to a relative 2^-8 = EPS16 / 2) and in the output's final rounding to bf16 (EPS16 / 2 of |out| <= max|v|). So
    |out - ref| <= 2 * (EPS16 / 2) * sum_j p_j |v_j| + 2 * (EPS16 / 2) * max|v| <= 2 * EPS16 * max|v| / (1 - rate)
    (the kept probabilities sum to at most 1 / (1 - rate)). A wrong scale, mask or padding moves outputs by a
    sizeable fraction of max|v|."""
    q, k, v = _qkv(dtype=jnp.bfloat16)
    seed = jnp.int32(11)
    for rate in (0.0, 0.25):
        out = np.asarray(_flash(q, k, v, seed, rate), np.float32)
        ref = np.asarray(_reference(q, k, v, seed, rate), np.float32)
        assert out.dtype == np.float32 and _flash(q, k, v, seed, rate).dtype == jnp.bfloat16
        np.testing.assert_allclose(out, ref, rtol=0, atol=2 * EPS16 * max_abs(v) / (1 - rate), err_msg=str(rate))


def test_forward_with_dropout_matches_the_reference_and_follows_the_seed():
    q, k, v = _qkv()
    rate, seed = 0.25, jnp.int32(1234)
    out = _flash(q, k, v, seed, rate)
    ref = _reference(q, k, v, seed, rate)
    assert_close_to_scale(out, ref, _fwd_depth(20, HD), scale=_fwd_scale(q, k, v) / (1 - rate))
    # Other tile sizes regenerate the same mask: the bits depend on (seed, b, h, i, j) alone.
    assert_close_to_scale(_flash(q, k, v, seed, rate, block_q=16, block_k=32), ref, _fwd_depth(20, HD),
                          scale=_fwd_scale(q, k, v) / (1 - rate))
    # A uint32 seed with the same bits is the same seed; another seed is another mask.
    np.testing.assert_array_equal(np.asarray(_flash(q, k, v, jnp.uint32(1234), rate)), np.asarray(out))
    other = _flash(q, k, v, jnp.int32(1235), rate)
    assert max_abs(other - out) > 0.1 * max_abs(ref)
    assert max_abs(out - _flash(q, k, v, None, 0.0)) > 0.1 * max_abs(ref)  # dropout does something


def test_keep_mask_is_bernoulli_over_a_large_mask():
    rate = 0.25
    keep = np.asarray(fa.dropout_keep_mask(jnp.int32(7), 4, 4, 256, 256, rate))
    assert keep.shape == (4, 4, 256, 256) and keep.dtype == bool
    n = keep.size
    sigma = np.sqrt(rate * (1 - rate) / n)
    assert abs(keep.mean() - (1 - rate)) < 5 * sigma, (keep.mean(), sigma)
    # No structure that a per-row or per-column hash could leave: rows, columns, heads and batches each keep
    # 1 - rate (5 sigma over their own counts), and a square mask is not its own transpose.
    for axes, count in (((0, 1, 3), 4 * 4 * 256), ((0, 1, 2), 4 * 4 * 256), ((0, 2, 3), 4 * 256 * 256),
                        ((1, 2, 3), 4 * 256 * 256)):
        frac = keep.mean(axis=axes)
        assert np.all(np.abs(frac - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / count)), axes
    assert (keep[0, 0] != keep[0, 0].T).mean() > 0.3
    assert (keep[0, 0] != keep[0, 1]).mean() > 0.3 and (keep[0, 0] != keep[1, 0]).mean() > 0.3
    other = np.asarray(fa.dropout_keep_mask(jnp.int32(8), 4, 4, 256, 256, rate))
    assert (keep != other).mean() > 0.3
    assert np.asarray(fa.dropout_keep_mask(jnp.int32(7), 1, 1, 8, 8, 0.0)).all()


@pytest.mark.parametrize("rate", [0.0, 0.25])
def test_gradients_match_the_reference(rate):
    q, k, v = _qkv(length=13)
    ct = jax.random.normal(jax.random.key(9), q.shape)
    seed = jnp.int32(42)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * ct)
    flash = functools.partial(fa.flash_attention, dropout_rate=rate, seed=seed, block_q=8, block_k=8,
                              interpret=True)
    reference = functools.partial(fa.flash_attention_reference, dropout_rate=rate, seed=seed)
    got = jax.jit(jax.grad(functools.partial(loss, flash), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(functools.partial(loss, reference), argnums=(0, 1, 2)))(q, k, v)
    # The backward runs the forward's chain again and its transposed reductions (transformer_depth's grad rule).
    assert_trees_close(got, want, 3 * _fwd_depth(20, HD))


@pytest.mark.parametrize("rate", [0.0, 0.25])
def test_key_mask_matches_the_reference_forward_and_backward(rate):
    """A per-batch key mask (the encoder's padding of its gathered rows: a valid prefix, 13 and 6 of 20 keys here,
    so the second row's last key tiles are fully masked) equals the reference's where(mask, logits, min)."""
    q, k, v = _qkv()
    key_mask = jnp.arange(20)[None, :] < jnp.array([13, 6])[:, None]
    seed = jnp.int32(5)
    ct = jax.random.normal(jax.random.key(10), q.shape)
    flash = functools.partial(fa.flash_attention, dropout_rate=rate, seed=seed, key_mask=key_mask, block_q=8,
                              block_k=8, interpret=True)
    reference = functools.partial(fa.flash_attention_reference, dropout_rate=rate, seed=seed, key_mask=key_mask)
    got, want = jax.jit(flash)(q, k, v), jax.jit(reference)(q, k, v)
    assert_close_to_scale(got, want, _fwd_depth(20, HD), scale=_fwd_scale(q, k, v))
    unmasked = fa.flash_attention_reference(q, k, v, dropout_rate=rate, seed=seed)
    assert max_abs(got - unmasked) > 0.1  # the mask changed the output

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * ct)
    g = jax.jit(jax.grad(functools.partial(loss, flash), argnums=(0, 1, 2)))(q, k, v)
    w = jax.jit(jax.grad(functools.partial(loss, reference), argnums=(0, 1, 2)))(q, k, v)
    assert_trees_close(g, w, 3 * _fwd_depth(20, HD))
    assert max_abs(g[1][1, 6:]) == 0.0 and max_abs(g[2][1, 6:]) == 0.0  # masked keys get no gradient


def test_unsupported_names_what_is_missing(monkeypatch):
    q, k, v = _qkv(dtype=jnp.bfloat16)
    if not ON_GPU:
        assert "backend" in fa.flash_attention_unsupported(q, k, v)
        with pytest.raises(ValueError, match="cannot run here: the backend"):
            fa.flash_attention(q, k, v)
    assert fa.flash_attention_unsupported(q, k, v, interpret=True) is None
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert fa.flash_attention_unsupported(q, k, v) is None
    assert fa.flash_attention_unsupported(*_qkv(dtype=jnp.float32)) is None
    assert "not a key-padding mask" in fa.flash_attention_unsupported(q, k, v, mask=jnp.ones((B, 1, 20, 20), bool))
    assert fa.flash_attention_unsupported(q, k, v, mask=jnp.ones((B, 1, 1, 20), bool)) is None
    with pytest.raises(ValueError, match="key_mask must be"):
        fa.flash_attention(q, k, v, key_mask=jnp.ones((B, 1, 1, 20), bool), interpret=True)
    assert "one dtype" in fa.flash_attention_unsupported(q, k, v.astype(jnp.float32))
    assert "one dtype" in fa.flash_attention_unsupported(*(x.astype(jnp.int32) for x in (q, k, v)))
    assert "head dim 24" in fa.flash_attention_unsupported(*_qkv(hd=24, dtype=jnp.bfloat16))
    assert "head dim 272" in fa.flash_attention_unsupported(*_qkv(hd=272, dtype=jnp.bfloat16))
    assert "(B, T, H, hd)" in fa.flash_attention_unsupported(q[0], k[0], v[0])
    assert "do not match" in fa.flash_attention_unsupported(q, k, v[:, :5])


def test_bad_arguments_are_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="needs a seed"):
        fa.flash_attention(q, k, v, dropout_rate=0.1, interpret=True)
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\)"):
        fa.flash_attention(q, k, v, dropout_rate=1.0, seed=jnp.int32(0), interpret=True)
    with pytest.raises(ValueError, match="block_q must be a power of two"):
        fa.flash_attention(q, k, v, block_q=24, interpret=True)
    with pytest.raises(ValueError, match="seed must be an integer scalar"):
        fa.flash_attention(q, k, v, dropout_rate=0.1, seed=jnp.zeros(2, jnp.int32), interpret=True)


@pytest.mark.skipif(not ON_GPU, reason="the compiled Triton kernel needs a GPU")
@pytest.mark.parametrize("rate", [0.0, 0.1])
def test_compiled_kernel_matches_the_reference_on_gpu(rate):
    """MAR-B's attention (T = L = 320, not a multiple of the 128 block: padded; 12 heads of 64) in bf16."""
    ks = jax.random.split(jax.random.key(1), 4)
    q, k, v = (jax.random.normal(kk, (4, 320, 12, 64), jnp.bfloat16) for kk in ks[:3])
    ct = jax.random.normal(ks[3], q.shape, jnp.float32)
    seed = jnp.int32(5)
    flash = functools.partial(fa.flash_attention, dropout_rate=rate, seed=seed, block_q=128, block_k=64)
    reference = functools.partial(fa.flash_attention_reference, dropout_rate=rate, seed=seed)
    out, ref = (np.asarray(jax.jit(f)(q, k, v), np.float32) for f in (flash, reference))
    np.testing.assert_allclose(out, ref, rtol=0, atol=2 * EPS16 * max_abs(v) / (1 - rate))

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * ct)
    got, want = (jax.jit(jax.grad(functools.partial(loss, f), argnums=(0, 1, 2)))(q, k, v)
                 for f in (flash, reference))
    for a, r in zip(got, want):
        a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
        assert np.max(np.abs(a - r)) / np.max(np.abs(r)) < 5e-2
