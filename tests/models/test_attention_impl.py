"""attention_impl: "xla" (the reference's numerics), "cudnn" (fused, GPU bf16), "flash" (the Pallas kernel) and "auto"
(cudnn where it can run, flash for training with attention dropout on a GPU).

On CPU "auto" must be the XLA path bit for bit and "cudnn" must refuse with the reason; on a GPU the fused kernel
must match the XLA path to bf16 rounding, with key-padding masks, generation-order masks, a KV cache's short query
block, and through the gradient (the GPU tests run where a GPU is present, e.g. the benchmark machine)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from marval_jax.checkpoints import manager
from marval_jax.models import mar as mar_lib
from marval_jax.models import transformer as T

ON_GPU = jax.default_backend() == "gpu"


def _qkv(b=2, t=8, length=None, h=2, hd=16, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    length = length or t
    return (jax.random.normal(ks[0], (b, t, h, hd), dtype), jax.random.normal(ks[1], (b, length, h, hd), dtype),
            jax.random.normal(ks[2], (b, length, h, hd), dtype))


def _pad_mask(b, length, valid):
    return (jnp.arange(length)[None, :] < jnp.asarray(valid)[:, None])[:, None, None, :]


def test_unknown_impl_is_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="attention impl must be one of"):
        T.attention_core(q, k, v, impl="flashy")
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        mar_lib.MARConfig(attention_impl="cuDNN")
    with pytest.raises(ValueError, match="attention impl must be one of"):
        T.Block(8, 2, rngs=nnx.Rngs(0), attention_impl="fused")


@pytest.mark.skipif(ON_GPU, reason="the CPU fallback")
def test_auto_is_the_xla_path_off_gpu_and_cudnn_refuses():
    q, k, v = _qkv(dtype=jnp.bfloat16)
    mask = _pad_mask(2, 8, [8, 5])
    ref = T.attention_core(q, k, v, mask=mask, impl="xla")
    np.testing.assert_array_equal(np.asarray(T.attention_core(q, k, v, mask=mask, impl="auto"), np.float32),
                                  np.asarray(ref, np.float32))
    with pytest.raises(ValueError, match="cannot run here: the backend is 'cpu'"):
        T.attention_core(q, k, v, impl="cudnn")


def test_cudnn_conditions_name_what_is_missing(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    bf = jnp.bfloat16
    assert T.cudnn_attention_unsupported(*_qkv(dtype=bf)) is None
    assert "bfloat16/float16" in T.cudnn_attention_unsupported(*_qkv(dtype=jnp.float32))
    assert "dropout" in T.cudnn_attention_unsupported(*_qkv(dtype=bf), dropout=True)
    assert "head dim 12" in T.cudnn_attention_unsupported(*_qkv(hd=12, dtype=bf))
    assert "head dim 256" in T.cudnn_attention_unsupported(*_qkv(hd=256, dtype=bf))
    odd = _qkv(t=7, dtype=bf)
    assert T.cudnn_attention_unsupported(*odd) is None  # odd lengths are fine without a mask
    assert "even lengths" in T.cudnn_attention_unsupported(*odd, mask=_pad_mask(2, 7, [7, 3]))


def test_auto_picks_cudnn_for_inference_and_flash_for_training_with_dropout_on_gpu(monkeypatch):
    """On a GPU "auto" is cuDNN without dropout and the flash kernel with attention dropout (bf16/fp16 training,
    key-padding or no mask); float32, other masks and CPUs keep the XLA path."""
    bf = jnp.bfloat16
    q, k, v = _qkv(dtype=bf)
    pad, order = _pad_mask(2, q.shape[1], [q.shape[1], 3]), jnp.tril(jnp.ones((2, 1, q.shape[1], q.shape[1]), bool))
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert T.auto_attention_impl(q, k, v, dropout=True) == "xla"  # not a GPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert T.auto_attention_impl(q, k, v) == "cudnn"
    assert T.auto_attention_impl(q, k, v, mask=pad) == "cudnn"
    assert T.auto_attention_impl(q, k, v, dropout=True) == "flash"
    assert T.auto_attention_impl(q, k, v, mask=pad, dropout=True) == "flash"
    assert T.auto_attention_impl(q, k, v, mask=order, dropout=True) == "xla"  # a per-query mask: not the kernel's
    assert T.auto_attention_impl(*_qkv(), dropout=True) == "xla"  # float32


@pytest.mark.skipif(ON_GPU, reason="the CPU path")
def test_training_with_attention_dropout_off_gpu_keeps_the_xla_path():
    """MAR pretraining (attn_dropout 0.1) under "auto" on a CPU: the XLA path with jax.random dropout, the same
    numbers as "xla"."""
    q, k, v = _qkv(dtype=jnp.bfloat16)
    rng = jax.random.key(3)
    a = T.attention_core(q, k, v, attn_drop=0.1, rng=rng, impl="auto")
    b = T.attention_core(q, k, v, attn_drop=0.1, rng=rng, impl="xla")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(ON_GPU, reason="the CPU refusal")
def test_flash_refuses_off_gpu():
    q, k, v = _qkv(dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="'flash' cannot run here: .*backend"):
        T.attention_core(q, k, v, attn_drop=0.1, rng=jax.random.key(0), impl="flash")
    assert mar_lib.MARConfig(attention_impl="flash").attention_impl == "flash"


@pytest.mark.skipif(not ON_GPU, reason="the Pallas kernel compiles for GPUs only")
def test_flash_matches_xla_without_dropout_and_keeps_the_rate_on_gpu():
    """Without dropout "flash" is the XLA path to bf16 rounding (forward and gradient); with dropout the output's
    mean over keys-and-values of ones is 1 (inverted dropout), and two keys give two masks."""
    q, k, v = _qkv(b=2, t=40, h=2, hd=64, dtype=jnp.bfloat16)
    f = lambda impl: lambda q: T.attention_core(q, k, v, impl=impl).astype(jnp.float32)  # noqa: E731
    a, b = f("flash")(q), f("xla")(q)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=4 * 2.0 ** -8 * float(jnp.abs(b).max()))
    ga = jax.grad(lambda q: f("flash")(q).sum())(q).astype(jnp.float32)
    gb = jax.grad(lambda q: f("xla")(q).sum())(q).astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(ga), np.asarray(gb), rtol=0, atol=8 * 2.0 ** -8 * float(jnp.abs(gb).max()))
    mask = _pad_mask(2, 40, [40, 23])  # the encoder's key padding: the kernel's key mask
    a = T.attention_core(q, k, v, mask=mask, impl="flash").astype(jnp.float32)
    b = T.attention_core(q, k, v, mask=mask, impl="xla").astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=4 * 2.0 ** -8 * float(jnp.abs(b).max()))
    ones = jnp.ones_like(v)
    d1 = T.attention_core(q, k, ones, attn_drop=0.5, rng=jax.random.key(1), impl="flash").astype(jnp.float32)
    d2 = T.attention_core(q, k, ones, attn_drop=0.5, rng=jax.random.key(2), impl="flash").astype(jnp.float32)
    # per query row the kept mass / (1 - r) has mean 1 and variance r/(1-r) sum_j p_j^2 (~0.1 for these logits of
    # unit variance over 40 keys); the mean of 160 rows has sd ~0.025, so 0.15 is ~6 sd
    assert abs(float(d1.mean()) - 1.0) < 0.15 and not np.array_equal(np.asarray(d1), np.asarray(d2))


def test_attention_impl_is_not_architectural():
    """Checkpoints restore across implementations (same parameters), also those written before the field."""
    assert "attention_impl" in manager.NON_ARCHITECTURAL
    cfg = dataclasses.asdict(mar_lib.MARConfig())
    old = {k: v for k, v in cfg.items() if k != "attention_impl"}
    manager.check_config({"model": old}, {"model": dict(cfg, attention_impl="xla")})


@pytest.mark.skipif(not ON_GPU, reason="cuDNN's fused attention needs a GPU")
@pytest.mark.parametrize("case", ["plain", "key_padding", "generation_order", "cache_block"])
def test_cudnn_matches_xla_on_gpu(case):
    b, h, hd = 4, 12, 64
    t = length = 320
    mask = None
    if case == "key_padding":
        t = length = 140
        mask = _pad_mask(b, length, [140, 100, 64, 77])
    if case == "generation_order":
        rank = jax.random.permutation(jax.random.key(5), t)
        mask = jnp.broadcast_to((rank[None, :] <= rank[:, None])[None, None], (b, 1, t, t))
    if case == "cache_block":
        t, length = 16, 336
        mask = _pad_mask(b, length, [336, 300, 200, 100])
    q, k, v = _qkv(b, t, length, h, hd, jnp.bfloat16, seed=1)
    ref = np.asarray(T.attention_core(q, k, v, mask=mask, impl="xla"), np.float32)
    out = np.asarray(T.attention_core(q, k, v, mask=mask, impl="cudnn"), np.float32)
    assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) < 2e-2, case

    def loss(q, k, v, impl):
        return jnp.sum(T.attention_core(q, k, v, mask=mask, impl=impl).astype(jnp.float32) ** 2)
    g_ref = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, "xla")
    g_out = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, "cudnn")
    for a, r in zip(g_out, g_ref):
        a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
        assert np.max(np.abs(a - r)) / np.max(np.abs(r)) < 5e-2, case


@pytest.mark.skipif(not ON_GPU, reason="the Pallas kernel compiles for GPUs only")
def test_auto_with_dropout_is_the_flash_kernel_on_gpu():
    q, k, v = _qkv(b=2, t=40, h=2, hd=64, dtype=jnp.bfloat16)
    rng = jax.random.key(5)
    a = T.attention_core(q, k, v, attn_drop=0.1, rng=rng, impl="auto")
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(T.attention_core(q, k, v, attn_drop=0.1, rng=rng, impl="flash"), np.float32))
    assert not np.array_equal(np.asarray(a, np.float32),
                              np.asarray(T.attention_core(q, k, v, attn_drop=0.1, rng=rng, impl="xla"), np.float32))


@pytest.mark.skipif(not ON_GPU, reason="cuDNN's fused attention needs a GPU")
def test_mar_b_forward_auto_matches_xla_on_gpu():
    """The bf16 MAR-B condition pass (encoder with its key-padding mask, decoder unmasked) under "auto" vs "xla"."""
    cfg = mar_lib.MARConfig(**mar_lib.IMAGENET_256, **mar_lib.RELEASED_SIZES["base"], dtype="bfloat16",
                            attn_dropout=0.0, proj_dropout=0.0)
    outs = {}
    for impl in ("auto", "xla"):
        model = mar_lib.MAR(dataclasses.replace(cfg, attention_impl=impl), rngs=nnx.Rngs(0))
        tokens = jax.random.normal(jax.random.key(1), (2, cfg.seq_len, cfg.token_dim))
        mask = (jax.random.uniform(jax.random.key(2), (2, cfg.seq_len)) < 0.6).astype(jnp.float32)
        class_emb = model.class_emb(jnp.array([3, 7]))
        enc_len = cfg.buffer_size + cfg.seq_len
        outs[impl] = np.asarray(model.condition(tokens, mask, class_emb, enc_len=enc_len), np.float32)
    rel = np.max(np.abs(outs["auto"] - outs["xla"])) / np.max(np.abs(outs["xla"]))
    assert 0 < rel < 5e-2, rel  # 0 would mean the fused kernel never ran
