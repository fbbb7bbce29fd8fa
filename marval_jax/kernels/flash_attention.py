"""Fused flash attention with attention dropout, as a Pallas kernel for GPUs (Triton lowering).

What it replaces: models/transformer.attention_core's "xla" path, which training takes whenever attention dropout is
on (cuDNN's fused attention has no dropout) and which materialises the B x H x T x L float32 logits and
probabilities. This kernel computes the same thing - logits in float32 scaled by hd^-0.5, softmax in float32,
inverted dropout on the probabilities, the probabilities cast to v's dtype for p.v - tile by tile with an online
softmax (FlashAttention-2), storing only the output and one logsumexp per query row; its backward recomputes the
probabilities from q, k and that logsumexp. Masks: a per-batch key mask only (the encoder's padding
of its gathered rows, models/mar.py), added to the logits as a bias.

The dropout mask is a counter-based hash, so the backward regenerates the forward's bits instead of storing them:
keep[b, h, i, j] = fmix32(R[b, h, i] + C[b, h, j]) >= round(rate * 2^32) as unsigned 32-bit integers, where fmix32 is
MurmurHash3's finalizer and R, C are per-row and per-column hashes of (seed, batch, head, index) computed outside the
kernel (small (B, H, T) and (B, H, L) int32 arrays). Inside the kernel that is one add, one fmix32 (two wrapping
multiplies, three xor-shifts) and a compare per element, in int32 with logical shifts and the unsigned compare done
as a signed one with the sign bit flipped - integer ops Triton has. The bits depend on (seed, b, h, i, j) alone, not
on block sizes or padding; `dropout_keep_mask` materialises the same mask for tests and references.

Padding: T and L are padded to multiples of the block sizes and the head dim to a power of two (Triton's tiles are
powers of two); padded keys are masked inside the kernel, padded queries and head-dim columns are sliced off.

Several devices: with a mesh in context (`jax.set_mesh`), the call runs inside shard_map (kernels/sharding.py),
batch over ("data", "fsdp") and heads over "tensor" where they divide; the hashes and the key bias are computed on
the global shapes first and split like q, so the bits are those of the single-device call.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from marval_jax.kernels import sharding

_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_LOG2E = math.log2(math.e)
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # padded keys' logits: finite, so no inf - inf anywhere
_INT32_MIN = -(2 ** 31)


def _i32(c: int) -> int:
    """A 32-bit constant as the int32 with the same bits (so it is a valid int32 literal in XLA and Triton)."""
    return c - 2 ** 32 if c >= 2 ** 31 else c


_M1, _M2, _GOLDEN = _i32(0x85EBCA6B), _i32(0xC2B2AE35), _i32(0x9E3779B9)


def _fmix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer on int32 bits: multiplies wrap, shifts are logical, so the bits are those of
    the uint32 version. Same ops in XLA and in the Triton kernel, hence the same bits."""
    x = x ^ lax.shift_right_logical(x, 16)
    x = x * _M1
    x = x ^ lax.shift_right_logical(x, 13)
    x = x * _M2
    return x ^ lax.shift_right_logical(x, 16)


def _threshold(rate: float) -> int:
    """round(rate * 2^32) as the int32 that compares like it once both sides have the sign bit flipped."""
    return min(int(round(rate * 2 ** 32)), 2 ** 32 - 1) + _INT32_MIN


def _keep(rows: jax.Array, cols: jax.Array, rate: float) -> jax.Array:
    """Keep bits of a tile: rows (..., t) and cols (..., l) int32 hashes -> (..., t, l) bool, kept with prob 1-rate."""
    bits = _fmix32(rows[..., :, None] + cols[..., None, :])
    return (bits ^ _INT32_MIN) >= _threshold(rate)


def _as_seed(seed) -> jax.Array:
    seed = jnp.asarray(seed)
    if seed.ndim != 0 or not jnp.issubdtype(seed.dtype, jnp.integer):
        raise ValueError(f"seed must be an integer scalar, got {seed.dtype} of shape {seed.shape}")
    if seed.dtype == jnp.uint32:
        return lax.bitcast_convert_type(seed, jnp.int32)
    return seed.astype(jnp.int32)


def _streams(seed, b: int, h: int, t: int, l: int) -> tuple[jax.Array, jax.Array]:
    """Row hashes (B, H, t) and column hashes (B, H, l), int32, of (seed, batch, head, index). Rows take the even
    counters and columns the odd ones, so R != C and a square mask is not symmetric."""
    bh = (jnp.arange(b, dtype=jnp.int32)[:, None] * h + jnp.arange(h, dtype=jnp.int32)[None, :])
    key = _fmix32(_as_seed(seed) ^ _fmix32(bh + _GOLDEN))[..., None]

    def stream(n, odd):
        ctr = 2 * jnp.arange(n, dtype=jnp.int32) + odd
        return _fmix32(_fmix32(key ^ ctr) + key)
    return stream(t, 0), stream(l, 1)


def _check_rate(rate: float):
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")


def dropout_keep_mask(seed, b: int, h: int, t: int, l: int, rate: float) -> jax.Array:
    """The kernel's dropout mask materialised: (B, H, T, L) bool, True = kept (probability 1 - rate)."""
    _check_rate(rate)
    rows, cols = _streams(seed, b, h, t, l)
    return _keep(rows, cols, rate)


def flash_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, dropout_rate: float = 0.0,
                              seed=None, key_mask: jax.Array | None = None) -> jax.Array:
    """attention_core's "xla" computation with `dropout_keep_mask`'s mask in place of jax.random.bernoulli: what
    `flash_attention` must equal up to rounding. Materialises the logits; for tests."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * (q.shape[-1] ** -0.5)
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout_rate > 0.0:
        b, t, h, _ = q.shape
        keep = dropout_keep_mask(seed, b, h, t, k.shape[1], dropout_rate)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), jnp.zeros_like(probs))
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def flash_attention_unsupported(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                                interpret: bool = False) -> str | None:
    """Why `flash_attention` cannot take this call (None if it can), in the style of transformer.py's
    cudnn_attention_unsupported."""
    if not interpret and jax.default_backend() != "gpu":
        return f"the backend is {jax.default_backend()!r}, not 'gpu' (interpret=True runs the kernel anywhere)"
    if mask is not None and not is_key_padding_mask(mask, q.shape[0], k.shape[1]):
        return (f"the attention mask of shape {mask.shape} is not a key-padding mask (B or 1, 1, 1, L): the flash "
                f"kernel masks keys per batch row only")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return f"q, k, v must be (B, T, H, hd), got shapes {q.shape}, {k.shape}, {v.shape}"
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        return f"q (B, T, H, hd) and k, v (B, L, H, hd) do not match: {q.shape}, {k.shape}, {v.shape}"
    if not (q.dtype == k.dtype == v.dtype and any(q.dtype == d for d in _DTYPES)):
        return f"q, k, v must share one dtype of bfloat16/float16/float32, got {q.dtype}, {k.dtype}, {v.dtype}"
    hd = q.shape[-1]
    if hd % 16 or hd > 256:
        return f"head dim {hd} is not a multiple of 16 up to 256"
    return None


def is_key_padding_mask(mask: jax.Array, b: int, l: int) -> bool:
    """Whether an attention mask (True = may attend, broadcastable to (B, H, T, L)) masks keys only, the same for
    every head and query: shape (B or 1, 1, 1, L) - the encoder's padding of its gathered rows (models/mar.py)."""
    return mask.ndim == 4 and mask.shape[1] == mask.shape[2] == 1 and mask.shape[0] in (1, b) and mask.shape[3] == l


class _Cfg(NamedTuple):
    """Static settings of one call (hashable: custom_vjp's nondiff argument)."""
    rate: float
    scale: float       # hd^-0.5 of the unpadded head dim
    kv_len: int        # unpadded number of keys (those past it are padding)
    block_q: int
    block_k: int
    interpret: bool
    masked: bool = False  # a per-batch key mask, passed as an additive bias (B, H, L): 0 or _MASK_VALUE


def _block(requested: int, length: int, name: str, interpret: bool) -> int:
    """The tile size used: the requested power of two, shrunk to the smallest power of two covering `length`."""
    if requested <= 0 or requested & (requested - 1):
        raise ValueError(f"{name} must be a power of two, got {requested}")
    if not interpret and requested < 16:
        raise ValueError(f"{name} must be at least 16 on GPU (Triton's dot tiles), got {requested}")
    return min(requested, max(16 if not interpret else 1, pl.next_power_of_2(length)))


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, dropout_rate: float = 0.0, seed=None,
                    key_mask: jax.Array | None = None, block_q: int = 64, block_k: int = 64,
                    interpret: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(hd)) v with inverted attention dropout, fused: q (B, T, H, hd), k, v (B, L, H, hd) ->
    (B, T, H, hd) in q's dtype. `seed` (an integer scalar array, a fresh one per step, e.g.
    jax.random.bits(key, dtype=jnp.uint32)) picks the dropout mask, `dropout_keep_mask(seed, ...)`; needed when
    dropout_rate > 0. block_q / block_k: tile sizes (powers of two, >= 16 on GPU; shrunk for short sequences).
    key_mask: (B, L) bool, True = may attend (every row needs one such key), e.g. the encoder's padding.
    interpret=True runs the kernels in Pallas' interpreter (any backend; for tests). Differentiable in q, k, v."""
    why = flash_attention_unsupported(q, k, v, interpret=interpret)
    if why is not None:
        raise ValueError(f"flash_attention cannot run here: {why}")
    _check_rate(dropout_rate)
    if dropout_rate > 0.0 and seed is None:
        raise ValueError("flash_attention with dropout_rate > 0 needs a seed")
    b, t, h, hd = q.shape
    l = k.shape[1]
    bq = _block(block_q, t, "block_q", interpret)
    bk = _block(block_k, l, "block_k", interpret)
    tp, lp, hdp = pl.cdiv(t, bq) * bq, pl.cdiv(l, bk) * bk, pl.next_power_of_2(hd)
    if key_mask is not None and key_mask.shape != (b, l):
        raise ValueError(f"key_mask must be (B, L) = {(b, l)}, got {key_mask.shape}")
    cfg = _Cfg(float(dropout_rate), hd ** -0.5, l, bq, bk, bool(interpret), key_mask is not None)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, hdp - hd)))  # noqa: E731
    rows = cols = None
    if dropout_rate > 0.0:
        rows, cols = _streams(seed, b, h, t, l)
        rows = jnp.pad(rows, ((0, 0), (0, 0), (0, tp - t)))
        cols = jnp.pad(cols, ((0, 0), (0, 0), (0, lp - l)))
    bias = None
    if key_mask is not None:  # (B, H, Lp) like the column hashes, so it rides the same BlockSpecs
        bias = jnp.where(key_mask, 0.0, _MASK_VALUE).astype(jnp.float32)
        bias = jnp.broadcast_to(jnp.pad(bias, ((0, 0), (0, lp - l)))[:, None, :], (b, h, lp))
    out = _flash_on_mesh(pad(q, tp), pad(k, lp), pad(v, lp), rows, cols, bias, cfg)
    return out[:, :t, :, :hd]


def _flash_on_mesh(q, k, v, rows, cols, bias, cfg: _Cfg):
    """`_flash` split over the mesh in context (kernels/sharding.py): batch over ("data", "fsdp"), heads over
    "tensor", where they divide B and H; a plain call without such a mesh. The dropout hashes and the key bias
    come in computed on the global (B, H, .) shapes and are split like q, so every device draws the bits that the
    single-device call draws for its (batch, head) slice; T, L and the head dim stay whole on each device."""
    mesh = sharding.context_mesh()
    batch = sharding.split_axes(mesh, q.shape[0], sharding.BATCH_AXES)
    heads = sharding.split_axes(mesh, q.shape[2], sharding.TENSOR_AXES)
    if not batch and not heads:
        return _flash(q, k, v, rows, cols, bias, cfg)
    b_, h_ = sharding.entry(batch), sharding.entry(heads)
    extra = [a for a in (rows, cols, bias) if a is not None]

    def local(q, k, v, *extra):
        extra = list(extra)
        r, c = (extra.pop(0), extra.pop(0)) if rows is not None else (None, None)
        return _flash(q, k, v, r, c, extra.pop(0) if bias is not None else None, cfg)
    qkv_spec = P(b_, None, h_, None)
    return sharding.shard_call(local, mesh, [qkv_spec] * 3 + [P(b_, h_, None)] * len(extra), qkv_spec,
                               q, k, v, *extra)


# ---------------------------------------------------------------- kernels
# Grids are (blocks along the sequence, B, H): programs of one (batch, head) run next to each other, sharing K / V
# (or Q / dO) in L2. Logits are kept in base 2 (scaled by log2 e) so the exponentials are exp2; the stored
# logsumexp is base 2 as well.

def _scores(q, k, col0, cfg: _Cfg, block_k: int, kb=None):
    """Base-2 logits of a (block_q, block_k) tile in float32, padded keys (index >= kv_len) masked, plus the key
    mask's bias `kb` (block_k,) where given."""
    s = _dot_nt(q, k) * (cfg.scale * _LOG2E)
    if kb is not None:
        s = s + kb[None, :]
    if pl.cdiv(cfg.kv_len, cfg.block_k) * cfg.block_k != cfg.kv_len:
        cols = col0 + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        s = jnp.where(cols < cfg.kv_len, s, _MASK_VALUE)
    return s


def _dot_t(a, b):
    """a^T b in float32 (contracting the first axes)."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    """a b in float32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nt(a, b):
    """a b^T in float32 (contracting the last axes)."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _split_refs(refs, cfg: _Cfg, n_out: int):
    """(row hashes, column hashes, key bias, outputs) from a kernel's trailing refs; absent inputs are None."""
    refs = list(refs)
    r_ref, c_ref = (refs.pop(0), refs.pop(0)) if cfg.rate > 0.0 else (None, None)
    kb_ref = refs.pop(0) if cfg.masked else None
    assert len(refs) == n_out
    return r_ref, c_ref, kb_ref, refs


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, cfg: _Cfg):
    r_ref, c_ref, kb_ref, (o_ref, lse_ref) = _split_refs(refs, cfg, 2)
    bq, bk = cfg.block_q, cfg.block_k
    q = q_ref[...]
    rows = r_ref[...] if cfg.rate > 0.0 else None

    def body(j, carry):
        o, m, l = carry
        kv = pl.ds(j * bk, bk)
        s = _scores(q, k_ref[kv, :], j * bk, cfg, bk, kb_ref[kv] if cfg.masked else None)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)  # the row sum runs over the undropped p
        if cfg.rate > 0.0:
            p = jnp.where(_keep(rows, c_ref[kv], cfg.rate), p, 0.0)
        v = v_ref[kv, :]
        o = alpha[:, None] * o + _dot(p.astype(v.dtype), v)
        return o, m_new, l

    o = jnp.zeros((bq, q.shape[1]), jnp.float32)
    m = jnp.full((bq,), -jnp.inf, jnp.float32)
    l = jnp.zeros((bq,), jnp.float32)
    o, m, l = lax.fori_loop(0, k_ref.shape[0] // bk, body, (o, m, l))
    inv = 1.0 / (1.0 - cfg.rate) if cfg.rate > 0.0 else 1.0
    o_ref[...] = (o * (inv / l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(l)


def _probs_and_dp(q, k, v, do, lse, delta, col0, rows, cols, kb, cfg: _Cfg):
    """Recomputed tile (block_q, block_k): the kept-and-scaled probabilities P~ (for dV) and dS = P (dP - delta),
    where dP is dO V^T through the same dropout (mask and 1/(1-rate)) - FlashAttention-2's backward with dropout."""
    p = jnp.exp2(_scores(q, k, col0, cfg, k.shape[0], kb) - lse[:, None])
    dp = _dot_nt(do, v)
    if cfg.rate > 0.0:
        keep, inv = _keep(rows, cols, cfg.rate), 1.0 / (1.0 - cfg.rate)
        pd = jnp.where(keep, p * inv, 0.0)
        dp = jnp.where(keep, dp * inv, 0.0)
    else:
        pd = p
    return pd, p * (dp - delta[:, None])


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Cfg):
    r_ref, c_ref, kb_ref, (dk_ref, dv_ref) = _split_refs(refs, cfg, 2)
    bq, bk = cfg.block_q, cfg.block_k
    k, v = k_ref[...], v_ref[...]
    col0 = pl.program_id(0) * bk
    cols = c_ref[...] if cfg.rate > 0.0 else None
    kb = kb_ref[...] if cfg.masked else None

    def body(i, carry):
        dk, dv = carry
        qs = pl.ds(i * bq, bq)
        q, do = q_ref[qs, :], do_ref[qs, :]
        rows = r_ref[qs] if cfg.rate > 0.0 else None
        pd, ds = _probs_and_dp(q, k, v, do, lse_ref[qs], delta_ref[qs], col0, rows, cols, kb, cfg)
        dv = dv + _dot_t(pd.astype(do.dtype), do)
        dk = dk + _dot_t(ds.astype(q.dtype), q)
        return dk, dv

    zeros = jnp.zeros((bk, k.shape[1]), jnp.float32)
    dk, dv = lax.fori_loop(0, q_ref.shape[0] // bq, body, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Cfg):
    r_ref, c_ref, kb_ref, (dq_ref,) = _split_refs(refs, cfg, 1)
    bk = cfg.block_k
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    rows = r_ref[...] if cfg.rate > 0.0 else None

    def body(j, dq):
        kv = pl.ds(j * bk, bk)
        k = k_ref[kv, :]
        cols = c_ref[kv] if cfg.rate > 0.0 else None
        kb = kb_ref[kv] if cfg.masked else None
        _, ds = _probs_and_dp(q, k, v_ref[kv, :], do, lse, delta, j * bk, rows, cols, kb, cfg)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, k_ref.shape[0] // bk, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


# ---------------------------------------------------------------- pallas_call wiring

def _specs(cfg: _Cfg, hdp: int, tp: int, lp: int, along_q: bool):
    """BlockSpecs for a grid (n, B, H) stepping along the queries (along_q) or the keys: the stepped operand's
    tiles and the other operand's full rows. Returns (query-side 4-D, key-side 4-D, query-side row, key-side row)."""
    if along_q:
        qs = pl.BlockSpec((None, cfg.block_q, None, hdp), lambda i, b, h: (b, i, h, 0))
        ks = pl.BlockSpec((None, lp, None, hdp), lambda i, b, h: (b, 0, h, 0))
        qr = pl.BlockSpec((None, None, cfg.block_q), lambda i, b, h: (b, h, i))
        kr = pl.BlockSpec((None, None, lp), lambda i, b, h: (b, h, 0))
    else:
        qs = pl.BlockSpec((None, tp, None, hdp), lambda j, b, h: (b, 0, h, 0))
        ks = pl.BlockSpec((None, cfg.block_k, None, hdp), lambda j, b, h: (b, j, h, 0))
        qr = pl.BlockSpec((None, None, tp), lambda j, b, h: (b, h, 0))
        kr = pl.BlockSpec((None, None, cfg.block_k), lambda j, b, h: (b, h, j))
    return qs, ks, qr, kr


def _call(kernel, cfg: _Cfg, grid, in_specs, out_specs, out_shape, name: str, *args):
    params = None if cfg.interpret else plgpu.CompilerParams(num_warps=4, num_stages=2)
    return pl.pallas_call(functools.partial(kernel, cfg=cfg), grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, compiler_params=params, interpret=cfg.interpret, name=name)(*args)


def _extras(cfg: _Cfg, rows, cols, bias, qr, kr) -> tuple[list, list]:
    """(BlockSpecs, operands) of the optional inputs, in the order _split_refs reads them: the dropout's row and
    column hashes (rate > 0), then the key bias (masked)."""
    specs = ([qr, kr] if cfg.rate > 0.0 else []) + ([kr] if cfg.masked else [])
    args = ([rows, cols] if cfg.rate > 0.0 else []) + ([bias] if cfg.masked else [])
    return specs, args


def _forward(q, k, v, rows, cols, bias, cfg: _Cfg):
    b, tp, h, hdp = q.shape
    lp = k.shape[1]
    qs, ks, qr, kr = _specs(cfg, hdp, tp, lp, along_q=True)
    specs, extra = _extras(cfg, rows, cols, bias, qr, kr)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tp), jnp.float32)]
    return _call(_fwd_kernel, cfg, (tp // cfg.block_q, b, h), [qs, ks, ks] + specs, [qs, qr], out_shape,
                 "flash_attention_fwd", q, k, v, *extra)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, rows, cols, bias, cfg: _Cfg):
    return _forward(q, k, v, rows, cols, bias, cfg)[0]


def _flash_fwd(q, k, v, rows, cols, bias, cfg: _Cfg):
    out, lse = _forward(q, k, v, rows, cols, bias, cfg)
    return out, (q, k, v, rows, cols, bias, out, lse)


def _flash_bwd(cfg: _Cfg, res, do):
    q, k, v, rows, cols, bias, out, lse = res
    b, tp, h, hdp = q.shape
    lp = k.shape[1]
    # delta = rowsum(dO * O) with O the dropped output: equals rowsum(dP * P) of the softmax backward.
    delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), out.astype(jnp.float32))

    qs, ks, qr, kr = _specs(cfg, hdp, tp, lp, along_q=False)
    specs, extra = _extras(cfg, rows, cols, bias, qr, kr)
    dk, dv = _call(_dkdv_kernel, cfg, (lp // cfg.block_k, b, h), [qs, ks, ks, qs, qr, qr] + specs, [ks, ks],
                   [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                   "flash_attention_dkdv", q, k, v, do, lse, delta, *extra)

    qs, ks, qr, kr = _specs(cfg, hdp, tp, lp, along_q=True)
    specs, extra = _extras(cfg, rows, cols, bias, qr, kr)
    dq = _call(_dq_kernel, cfg, (tp // cfg.block_q, b, h), [qs, ks, ks, qs, qr, qr] + specs, qs,
               jax.ShapeDtypeStruct(q.shape, q.dtype), "flash_attention_dq", q, k, v, do, lse, delta, *extra)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
