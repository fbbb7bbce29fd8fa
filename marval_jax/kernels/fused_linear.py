"""LayerNorm fused into the Linear that follows it, with an optional bias + exact-GELU epilogue: one Pallas GPU kernel
for the pre-norm block's `qkv = Linear(LayerNorm(x))` and `h = gelu_erf(Linear(LayerNorm(x)))`.

On GPU XLA runs the LayerNorm and the GELU as memory-bound passes of their own beside the GEMM; here each program
of a (N tiles, M tiles) grid normalises its row tile of x in the GEMM's prologue and applies bias (and GELU) to its
float32 accumulator before the single store. `ln_linear` is a jax.custom_vjp: the forward is the kernel, the
backward is jax.vjp of `ln_linear_reference` (recomputed from the inputs), so gradients are the XLA path's.

Numerics are those of models/transformer.py's nnx.LayerNorm + nnx.Linear with a compute `dtype` (flax 0.12): x,
gamma, beta, w and b are first cast to `dtype`; the statistics are computed in float32 from the cast x (mean and
mean of squares, var = max(0, E[x^2] - E[x]^2)); the normalisation runs in float32 and is rounded once to `dtype`;
the matmul takes `dtype` operands with a float32 accumulator. Two differences from the XLA path, both within one
rounding of `dtype`: the kernel adds the bias to the float32 accumulator and rounds once (nnx.Linear rounds the
product to `dtype`, then rounds again after the bias add), and GELU is evaluated on that float32 value with XLA's
rational erf approximation (`_erf_f32`: Pallas' Triton lowering has no erf) rather than on the rounded output.

Several devices: with a mesh in context (`jax.set_mesh`), the call runs inside shard_map (kernels/sharding.py),
x's first dimension over ("data", "fsdp") and w's columns over "tensor" where they divide (and leave each device a
column tile); gamma and beta replicated.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from marval_jax.kernels import sharding

ACTIVATIONS = (None, "gelu")
COMPUTE_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
MIN_BLOCK = 16        # smallest extent of a Triton dot operand (rows, K chunk, columns)
MAX_BLOCK_N = 128     # largest automatic N tile
MAX_BLOCK_K = 64      # largest K chunk that the prologue normalises and feeds to the dot at once
DEFAULT_BLOCK_M = 64
NUM_WARPS, NUM_STAGES = 4, 3


def gelu_erf(x: jax.Array) -> jax.Array:
    """Exact-erf GELU computed in float32 and rounded once to x's dtype, as PyTorch's GELU does for bf16 under
    autocast (jax.nn.gelu on bf16 rounds after each of its ops). Identical to jax.nn.gelu for float32. The model's
    GELU (models/transformer.py imports it from here: this package sits below models/) and the XLA reference of the
    fused kernel's epilogue."""
    if x.dtype == jnp.float32:
        return jax.nn.gelu(x, approximate=False)
    return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


def ln_linear_reference(x: jax.Array, gamma: jax.Array, beta: jax.Array, w: jax.Array, b: jax.Array, *,
                        eps: float, activation: str | None, dtype: Any) -> jax.Array:
    """gelu_erf?(nnx.Linear(nnx.LayerNorm(x))) as the model computes it (flax 0.12.8, float32 parameters, compute
    `dtype`), op for op: x (..., K), gamma/beta (K,), w (K, N), b (N,) -> (..., N) in `dtype`. The XLA path and the
    function that `ln_linear`'s backward differentiates."""
    x, gamma, beta = (jnp.asarray(a, dtype) for a in (x, gamma, beta))      # LayerNorm's promote_dtype
    xf = x.astype(jnp.promote_types(dtype, jnp.float32))                       # statistics in >= float32
    mean = xf.mean(-1)
    var = jnp.maximum(0.0, jax.lax.square(xf).mean(-1) - jax.lax.square(mean))  # use_fast_variance=True
    y = x - mean[..., None]
    mul = jax.lax.rsqrt(var + eps)[..., None] * gamma
    y = (y * mul + beta).astype(dtype)
    y, w, b = (jnp.asarray(a, dtype) for a in (y, w, b))                       # Linear's promote_dtype
    out = jax.lax.dot_general(y, w, (((y.ndim - 1,), (0,)), ((), ())))
    out = out + b.reshape((1,) * (out.ndim - 1) + (-1,))
    return gelu_erf(out) if activation == "gelu" else out


def _pow2_divisor(n: int, cap: int) -> int | None:
    """The largest power of two in [MIN_BLOCK, cap] that divides n, or None."""
    p = 1 << (max(cap, 1).bit_length() - 1)
    while p >= MIN_BLOCK:
        if n % p == 0:
            return p
        p //= 2
    return None


def _is_block(v) -> bool:
    return isinstance(v, int) and v >= MIN_BLOCK and v & (v - 1) == 0


def ln_linear_unsupported(x: jax.Array, w: jax.Array, *, dtype: Any = jnp.float32, activation: str | None = None,
                          interpret: bool = False, block_m: int = DEFAULT_BLOCK_M, block_n: int | None = None,
                          block_k: int | None = None) -> str | None:
    """Why the fused kernel cannot take this call (None if it can), in the style of transformer.py's
    cudnn_attention_unsupported: backend, dtype, shapes and block sizes. Triton blocks are powers of two, so K
    must split into power-of-two chunks >= 16 and N into power-of-two tiles >= 16."""
    if activation not in ACTIVATIONS:
        return f"activation must be one of {ACTIVATIONS}, got {activation!r}"
    if not interpret and jax.default_backend() != "gpu":
        return f"the backend is {jax.default_backend()!r}, not 'gpu' (and interpret=False)"
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in COMPUTE_DTYPES]:
        return f"compute dtype must be bfloat16, float16 or float32, got {jnp.dtype(dtype)}"
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
        return f"x (..., K) and w (K, N) do not match: x {x.shape}, w {w.shape}"
    k, n = w.shape
    if _pow2_divisor(k, MAX_BLOCK_K) is None:
        return f"feature dim K={k} is not a multiple of {MIN_BLOCK} (the prologue reads K in power-of-two chunks)"
    if not _is_block(block_m):
        return f"block_m must be a power of two >= {MIN_BLOCK}, got {block_m!r}"
    if block_n is None:
        if _pow2_divisor(n, MAX_BLOCK_N) is None:
            return f"output dim N={n} has no power-of-two tile >= {MIN_BLOCK} dividing it"
    elif not _is_block(block_n) or n % block_n:
        return f"block_n must be a power of two >= {MIN_BLOCK} dividing N={n}, got {block_n!r}"
    if block_k is not None and (not _is_block(block_k) or k % block_k):
        return f"block_k must be a power of two >= {MIN_BLOCK} dividing K={k}, got {block_k!r}"
    return None


def _erf_f32(x: jax.Array) -> jax.Array:
    """erf as XLA evaluates it in float32 (Eigen's rational interpolant, x clamped where erf rounds to +-1): plain
    arithmetic, so it lowers to Triton, which Pallas gives no erf."""
    alpha = (0.00022905065861350646, 0.0034082910107109506, 0.050955695062380861, 0.18520832239976145,
             1.128379143519084)
    beta = (-1.1791602954361697e-7, 0.000023547966471313185, 0.0010179625278914885, 0.014070470171167667,
            0.11098505178285362, 0.49746925110067538, 1.0)
    c = 3.7439211627767994
    x = jnp.minimum(jnp.maximum(x, -c), c)
    x2 = x * x
    p, q = jnp.full_like(x, alpha[0]), jnp.full_like(x, beta[0])
    for a in alpha[1:]:
        p = p * x2 + a
    for a in beta[1:]:
        q = q * x2 + a
    return x * p / q


def _kernel(x_ref, g_ref, bt_ref, w_ref, b_ref, o_ref, *, eps: float, block_k: int, activation: str | None):
    """One (block_m, block_n) output tile: LayerNorm statistics of the x row tile in float32 (one pass over K in
    chunks), then per K chunk normalise, round to the compute dtype and accumulate the dot in float32; bias and
    GELU on the accumulator; one store."""
    bm, k = x_ref.shape
    cdt = w_ref.dtype
    f32 = jnp.float32

    def cols(i):
        return pl.ds(pl.multiple_of(i * block_k, block_k), block_k)

    def x_chunk(i):  # LayerNorm casts x to the compute dtype, its statistics to float32
        return x_ref[:, cols(i)].astype(cdt).astype(f32)

    def stats(i, carry):
        s, s2 = carry
        xs = x_chunk(i)
        return s + jnp.sum(xs, axis=1), s2 + jnp.sum(xs * xs, axis=1)

    zeros = jnp.zeros((bm,), f32)
    s, s2 = jax.lax.fori_loop(0, k // block_k, stats, (zeros, zeros))
    mean = s / k
    var = jnp.maximum(0.0, s2 / k - mean * mean)
    rstd, mean = jax.lax.rsqrt(var + eps)[:, None], mean[:, None]

    def matmul(i, acc):
        c = cols(i)
        mul = rstd * g_ref[c].astype(f32)[None, :]
        y = ((x_chunk(i) - mean) * mul + bt_ref[c].astype(f32)[None, :]).astype(cdt)
        return acc + jnp.dot(y, w_ref[c, :], preferred_element_type=f32)

    acc = jax.lax.fori_loop(0, k // block_k, matmul, jnp.zeros((bm, o_ref.shape[1]), f32))
    acc = acc + b_ref[...].astype(f32)[None, :]
    if activation == "gelu":
        acc = 0.5 * acc * (1.0 + _erf_f32(acc * float(np.sqrt(0.5))))
    o_ref[...] = acc.astype(o_ref.dtype)


def _forward(x, gamma, beta, w, b, eps, activation, dtype, blocks):
    """The pallas_call on x flattened to (M, K), rows padded to a multiple of the row tile. The grid is (N tiles,
    M tiles): on the GPU the first grid axis varies fastest, so the programs that share an x row tile run together
    and re-read it from L2."""
    interpret, block_m, block_n, block_k, num_warps, num_stages = blocks
    lead, k, n = x.shape[:-1], x.shape[-1], w.shape[1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return jnp.zeros((*lead, n), dtype)
    bm = min(block_m, max(MIN_BLOCK, pl.next_power_of_2(m)))
    mp = pl.cdiv(m, bm) * bm
    if mp != m:
        x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
    gamma, beta, w, b = (a.astype(dtype) for a in (gamma, beta, w, b))  # promote_dtype, as the XLA path
    kernel = functools.partial(_kernel, eps=float(eps), block_k=block_k, activation=activation)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, n), dtype),
        grid=(n // block_n, mp // bm),
        in_specs=[pl.BlockSpec(block_shape=(bm, k), index_map=lambda j, i: (i, 0)),
                  pl.BlockSpec(block_shape=(k,), index_map=lambda j, i: (0,)),
                  pl.BlockSpec(block_shape=(k,), index_map=lambda j, i: (0,)),
                  pl.BlockSpec(block_shape=(k, block_n), index_map=lambda j, i: (0, j)),
                  pl.BlockSpec(block_shape=(block_n,), index_map=lambda j, i: (j,))],
        out_specs=pl.BlockSpec(block_shape=(bm, block_n), index_map=lambda j, i: (i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ln_linear_gelu" if activation == "gelu" else "ln_linear",
    )(x2, gamma, beta, w, b)
    return out[:m].reshape(*lead, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _ln_linear(x, gamma, beta, w, b, eps, activation, dtype, blocks):
    return _forward(x, gamma, beta, w, b, eps, activation, dtype, blocks)


def _ln_linear_fwd(x, gamma, beta, w, b, eps, activation, dtype, blocks):
    return _forward(x, gamma, beta, w, b, eps, activation, dtype, blocks), (x, gamma, beta, w, b)


def _ln_linear_bwd(eps, activation, dtype, blocks, residuals, g):
    def reference(*args):
        return ln_linear_reference(*args, eps=eps, activation=activation, dtype=dtype)
    _, vjp = jax.vjp(reference, *residuals)
    return vjp(g)


_ln_linear.defvjp(_ln_linear_fwd, _ln_linear_bwd)


def ln_linear(x: jax.Array, gamma: jax.Array, beta: jax.Array, w: jax.Array, b: jax.Array, *, eps: float = 1e-6,
              activation: str | None = None, dtype: Any = jnp.float32, interpret: bool = False,
              block_m: int = DEFAULT_BLOCK_M, block_n: int | None = None, block_k: int | None = None,
              num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES) -> jax.Array:
    """`ln_linear_reference` as one Pallas kernel: x (..., K), gamma/beta (K,), w (K, N), b (N,) -> (..., N) in
    `dtype`; activation None or "gelu" (exact erf). block_m: rows per program (a power of two >= 16; capped at the
    row count's); block_n: columns per program (a power of two >= 16 dividing N; None: the largest up to 128);
    block_k: the K chunk (a power of two >= 16 dividing K; None: the largest up to 64); num_warps / num_stages:
    Triton's (benchmarks/kernel_check.py --sweep times the combinations).
    interpret=True runs the kernel in Pallas' interpreter (any backend: the tests). Differentiable: the backward is
    the reference's vjp. Raises ValueError where `ln_linear_unsupported` gives a reason."""
    why = ln_linear_unsupported(x, w, dtype=dtype, activation=activation, interpret=interpret, block_m=block_m,
                                block_n=block_n, block_k=block_k)
    if why is not None:
        raise ValueError(f"ln_linear cannot run here: {why} (use ln_linear_reference)")
    k, n = w.shape
    mesh = sharding.context_mesh()
    rows = sharding.split_axes(mesh, x.shape[0], sharding.BATCH_AXES) if x.ndim >= 2 else ()
    cols = sharding.split_axes(mesh, n, sharding.TENSOR_AXES)
    n_local = n // sharding.axes_size(mesh, cols)
    tile_fits = n_local % block_n == 0 if block_n else _pow2_divisor(n_local, MAX_BLOCK_N) is not None
    if not tile_fits:  # a device's columns would admit no tile: keep the columns whole
        cols, n_local = (), n
    blocks = (bool(interpret), block_m, block_n or _pow2_divisor(n_local, MAX_BLOCK_N),
              block_k or _pow2_divisor(k, MAX_BLOCK_K), int(num_warps), int(num_stages))

    def call(x, gamma, beta, w, b):
        return _ln_linear(x, gamma, beta, w, b, float(eps), activation, jnp.dtype(dtype), blocks)
    if not rows and not cols:
        return call(x, gamma, beta, w, b)
    # On the mesh in context (kernels/sharding.py): x's first dimension over ("data", "fsdp"), w's and b's columns
    # (and the output's) over "tensor", where they divide; gamma and beta replicated. Rows are independent and
    # each column is one dot over the whole K, so every element is computed as on one device.
    c_ = sharding.entry(cols)
    lead = [sharding.entry(rows)] + [None] * (x.ndim - 2) if x.ndim >= 2 else []
    return sharding.shard_call(call, mesh, [P(*lead, None), P(), P(), P(None, c_), P(c_)], P(*lead, c_),
                               x, gamma, beta, w, b)
