"""Pre-norm ViT block as timm's `vision_transformer.Block` that MAR uses, with an explicit KV-cache pytree.

Layout and numerics follow the reference: fused qkv Linear with bias (rows [q | k | v], head-major), scale
hd^-0.5, exact-erf GELU, LayerNorm eps 1e-6, attention and projection dropout. Dropout takes an explicit key;
`rng=None` is eval mode.

Attention masks are boolean, True = may attend, broadcastable to (B, heads, T_query, T_key).
The KV cache is a plain dict pytree {"k": (B, L, H, hd), "v": (B, L, H, hd)} made by `init_kv_cache`; a call
with a cache writes this call's keys/values at `cache_positions` (B, T) and attends over the whole cache.
With `return_kv=True` and no cache, a call returns this call's own keys/values {"k", "v"} (B, T, H, hd) in the cache
slot instead of None (used to fill a cache from a full pass, marval_jax/sampling/cached_sampler.py).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from marval_jax.kernels.flash_attention import flash_attention, flash_attention_unsupported
from marval_jax.kernels.fused_linear import gelu_erf, ln_linear

LN_EPS = 1e-6
xavier = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()

KVCache = dict[str, jax.Array]


def dense(din: int, dout: int, *, rngs: nnx.Rngs, dtype: Any, kernel_init=xavier) -> nnx.Linear:
    """Linear with the reference's init (xavier_uniform, bias 0) and float32 parameters."""
    return nnx.Linear(din, dout, kernel_init=kernel_init, bias_init=zeros, dtype=dtype,
                      param_dtype=jnp.float32, rngs=rngs)


def cast_linear_params(model: nnx.Module) -> nnx.Module:
    """Casts every nnx.Linear's kernel and bias to the layer's compute dtype, in place on a merged model, and
    returns it. The layer casts them on every call anyway (the same numbers), so an inference loop - the samplers' AR
    loop - converts all weights once before the loop instead of at every step (XLA leaves those converts inside the
    loop body). Inference only: a training step's gradient must reach the float32 parameters."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear) and node.dtype is not None:
            for name in ("kernel", "bias"):
                var = getattr(node, name, None)
                if var is not None and var[...].dtype != node.dtype:
                    var.set_value(var[...].astype(node.dtype))
    return model


def layer_norm(dim: int, *, rngs: nnx.Rngs, dtype: Any, affine: bool = True) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=LN_EPS, use_bias=affine, use_scale=affine, dtype=dtype,
                         param_dtype=jnp.float32, rngs=rngs)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout with an explicit key; identity when `rng` is None or rate is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def init_kv_cache(batch: int, length: int, num_heads: int, head_dim: int, dtype=jnp.float32) -> KVCache:
    shape = (batch, length, num_heads, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _split_rng(rng, n):
    return (None,) * n if rng is None else tuple(jax.random.split(rng, n))


ATTENTION_IMPLS = ("xla", "cudnn", "flash", "flash_interpret", "auto")


def attention_core(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                   attn_drop: float = 0.0, rng: jax.Array | None = None, impl: str = "xla") -> jax.Array:
    """softmax(q k^T / sqrt(hd)) v per head: queries (B, T, H, hd), keys and values (B, L, H, hd) -> (B, T, H, hd).

    impl "xla": logits and softmax in float32, the probabilities (after dropout) cast to v's dtype for p.v; masked
    logits (mask False) set to float32's minimum (the reference's numerics; also timed alone by the benchmark
    suite's block/attention_core row). "cudnn": cuDNN's fused flash attention through jax.nn.dot_product_attention
    (GPU, bf16/fp16, no attention dropout; the mask becomes an additive bias; its speed against "xla" is measured
    by the benchmark suite's block rows, docs/benchmarks.md); raises where it cannot run. "auto": `auto_attention_impl`
    - "cudnn" where it can run, "flash" for bf16/fp16 training with attention dropout on a GPU, else "xla" (CPU
    runs and float32 runs keep the reference's numerics). "flash": the Pallas flash attention of
    kernels/flash_attention.py (GPU; attention dropout inside the kernel, its mask a hash of a seed drawn from `rng`,
    so the logits are never stored: the training path cuDNN cannot take); raises where it cannot run (a
    backend other than GPU; masks other than a key-padding one). Its dropout bits differ from "xla"'s jax.random
    ones (same distribution). "flash_interpret": the same kernel in Pallas' interpreter, any backend (tests)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    dropping = rng is not None and attn_drop > 0.0
    if impl == "auto":
        impl = auto_attention_impl(q, k, v, mask=mask, dropout=dropping)
    if impl in ("flash", "flash_interpret"):
        interpret = impl == "flash_interpret"
        why = flash_attention_unsupported(q, k, v, mask=mask, interpret=interpret)
        if why is not None:
            raise ValueError(f"attention impl {impl!r} cannot run here: {why} (use 'auto' or 'xla')")
        seed = jax.random.bits(rng, dtype=jnp.uint32) if dropping else None
        key_mask = None if mask is None else jnp.broadcast_to(mask[:, 0, 0, :], (q.shape[0], k.shape[1]))
        return flash_attention(q, k, v, dropout_rate=attn_drop if dropping else 0.0, seed=seed, key_mask=key_mask,
                               interpret=interpret)
    if impl == "cudnn":
        why = cudnn_attention_unsupported(q, k, v, mask=mask, dropout=dropping)
        if why is not None:
            raise ValueError(f"attention impl 'cudnn' cannot run here: {why} (use 'auto' or 'xla')")
        return _attention_core_cudnn(q, k, v, mask)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * (q.shape[-1] ** -0.5)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = dropout(probs, attn_drop, rng).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def auto_attention_impl(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                        dropout: bool = False) -> str:
    """What attention_impl="auto" runs for this call: "cudnn" where cuDNN's fused attention can take it (no dropout:
    sampling, evaluation); "flash" for bf16/fp16 calls with attention dropout (training) that the Pallas kernel can
    take on a GPU, where it trains MAR-B faster and in less memory than the XLA path, which stores the float32
    logits (measured: docs/benchmarks.md, "Round two on one H100"); else "xla". Its dropout bits are the kernel's
    hash, not jax.random's (the same distribution)."""
    if cudnn_attention_unsupported(q, k, v, mask=mask, dropout=dropout) is None:
        return "cudnn"
    if (dropout and q.dtype in (jnp.bfloat16, jnp.float16)
            and flash_attention_unsupported(q, k, v, mask=mask) is None):
        return "flash"
    return "xla"


def cudnn_attention_unsupported(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                                dropout: bool = False) -> str | None:
    """Why cuDNN's fused attention cannot take this call (None if it can): the conditions of
    jax.nn.dot_product_attention(implementation="cudnn") that MAR's calls can meet or miss."""
    if jax.default_backend() != "gpu":
        return f"the backend is {jax.default_backend()!r}, not 'gpu'"
    if not (q.dtype == k.dtype == v.dtype and q.dtype in (jnp.bfloat16, jnp.float16)):
        return f"cuDNN attention takes bfloat16/float16 q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}"
    if dropout:
        return "attention dropout is active (jax.nn.dot_product_attention has no dropout)"
    hd = q.shape[-1]
    if hd % 8 or hd > 128:
        return f"head dim {hd} is not a multiple of 8 up to 128"
    if mask is not None and (q.shape[1] % 2 or k.shape[1] % 2):
        return f"a masked call needs even lengths, got {q.shape[1]} queries and {k.shape[1]} keys"
    return None


def _attention_core_cudnn(q, k, v, mask):
    if mask is not None:  # cuDNN's bias needs the full (T, L) extent; batch and head dims may broadcast
        b, t, _, _ = q.shape
        mask = jnp.broadcast_to(mask, (b, mask.shape[1], t, k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=q.shape[-1] ** -0.5, implementation="cudnn")


class Attention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, *, attn_drop: float, proj_drop: float, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32, impl: str = "xla"):
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_drop, self.proj_drop, self.impl = attn_drop, proj_drop, impl
        self.qkv = dense(dim, 3 * dim, rngs=rngs, dtype=dtype)
        self.proj = dense(dim, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, rng: jax.Array | None = None,
                 cache: KVCache | None = None, cache_positions: jax.Array | None = None,
                 return_kv: bool = False) -> tuple[jax.Array, KVCache | None]:
        return self.attend(self.qkv(x), mask=mask, rng=rng, cache=cache, cache_positions=cache_positions,
                           return_kv=return_kv)

    def attend(self, qkv: jax.Array, *, mask: jax.Array | None = None, rng: jax.Array | None = None,
               cache: KVCache | None = None, cache_positions: jax.Array | None = None,
               return_kv: bool = False) -> tuple[jax.Array, KVCache | None]:
        """The attention after the qkv projection (B, T, 3 * width): the block's fused kernel computes that."""
        b, t, d3 = qkv.shape
        d = d3 // 3
        qkv = qkv.reshape(b, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if cache is not None:
            if cache_positions is None:
                raise ValueError("a KV cache needs cache_positions (B, T): where this call's keys are written")
            rows = jnp.arange(b)[:, None]
            cache = {"k": cache["k"].at[rows, cache_positions].set(k.astype(cache["k"].dtype)),
                     "v": cache["v"].at[rows, cache_positions].set(v.astype(cache["v"].dtype))}
            k, v = cache["k"].astype(q.dtype), cache["v"].astype(q.dtype)
        elif return_kv:
            cache = {"k": k, "v": v}
        r_attn, r_proj = _split_rng(rng, 2)
        out = attention_core(q, k, v, mask=mask, attn_drop=self.attn_drop, rng=r_attn, impl=self.impl)
        out = out.reshape(b, t, d)
        return dropout(self.proj(out), self.proj_drop, r_proj), cache


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, drop: float, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.drop = drop
        self.fc1 = dense(dim, hidden, rngs=rngs, dtype=dtype)
        self.fc2 = dense(hidden, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None, recompute_gelu: bool = False) -> jax.Array:
        gelu = jax.checkpoint(gelu_erf, prevent_cse=False) if recompute_gelu else gelu_erf
        return self.finish(gelu(self.fc1(x)), rng)

    def finish(self, h: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """The MLP after fc1 and GELU (the block's fused kernel computes those): dropout, fc2, dropout."""
        r1, r2 = _split_rng(rng, 2)
        return dropout(self.fc2(dropout(h, self.drop, r1)), self.drop, r2)


# model.kernels: how a block computes LayerNorm -> Linear (norm1 -> qkv, norm2 -> fc1 -> GELU). "xla": the modules
# one by one (the reference). "pallas": one fused Pallas kernel each (kernels/fused_linear.py; GPU only, docs/kernels.md).
# "pallas_interpret": the same kernels in Pallas' interpreter, on any backend (tests; slow).
KERNELS = ("xla", "pallas", "pallas_interpret")


def _norm(norm: nnx.LayerNorm, x: jax.Array, recompute: bool) -> jax.Array:
    return checkpointed(norm, "per_block", x, prevent_cse=False) if recompute else norm(x)


class Block(nnx.Module):
    """x += attn(norm1(x)); x += mlp(norm2(x)).

    recompute_elementwise (a call argument): the LayerNorms and the GELU run under jax.checkpoint, so a backward pass
    keeps only their inputs and recomputes their float32 intermediates (per element: the GELU's exp, erfc and
    product, 12 bytes on a 4x-wide activation; each LayerNorm's centred and scaled values). `scan_blocks` sets it:
    in a scan body every value the backward pass reads is a stored loop output, where the unrolled program's fusions
    recompute them anyway (docs/benchmarks.md, "Scanned blocks and their residuals"). Same values, same gradients.
    Without CSE prevention (no optimization barriers): a scan body keeps the recomputation apart by itself. The XLA
    path only: the fused Pallas kernels (`kernels`) define their own backward residuals."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *, attn_drop: float = 0.1,
                 proj_drop: float = 0.1, rngs: nnx.Rngs, dtype: Any = jnp.float32, attention_impl: str = "xla",
                 kernels: str = "xla"):
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        self.kernels = kernels
        self.norm1 = layer_norm(dim, rngs=rngs, dtype=dtype)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=proj_drop, rngs=rngs, dtype=dtype,
                              impl=attention_impl)
        self.norm2 = layer_norm(dim, rngs=rngs, dtype=dtype)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, rng: jax.Array | None = None,
                 cache: KVCache | None = None, cache_positions: jax.Array | None = None,
                 return_kv: bool = False, recompute_elementwise: bool = False) -> tuple[jax.Array, KVCache | None]:
        r_attn, r_mlp = _split_rng(rng, 2)
        if self.kernels == "xla":
            h, cache = self.attn(_norm(self.norm1, x, recompute_elementwise), mask=mask, rng=r_attn, cache=cache,
                                 cache_positions=cache_positions, return_kv=return_kv)
            x = x + h.astype(x.dtype)
            h = self.mlp(_norm(self.norm2, x, recompute_elementwise), r_mlp, recompute_gelu=recompute_elementwise)
            return x + h.astype(x.dtype), cache
        h, cache = self.attn.attend(self._ln_linear(x, self.norm1, self.attn.qkv), mask=mask, rng=r_attn,
                                    cache=cache, cache_positions=cache_positions, return_kv=return_kv)
        x = x + h.astype(x.dtype)
        h = self._ln_linear(x, self.norm2, self.mlp.fc1, activation="gelu")
        return x + self.mlp.finish(h, r_mlp).astype(x.dtype), cache

    def _ln_linear(self, x, norm: nnx.LayerNorm, linear: nnx.Linear, activation: str | None = None):
        return ln_linear(x, norm.scale[...], norm.bias[...], linear.kernel[...], linear.bias[...], eps=norm.epsilon,
                         activation=activation, dtype=linear.dtype or x.dtype,
                         interpret=self.kernels == "pallas_interpret")


# model.remat_policy (MARConfig.remat_policy): what a training step keeps of each transformer block for the backward
# pass. "none": everything. "dots_saveable": the block under jax.checkpoint with jax.checkpoint_policies.dots_saveable
# (the outputs of its matmuls - q/k/v, attention logits and p.v, proj, fc1, fc2 - are kept, the elementwise passes -
# LayerNorms, GELU, softmax, dropout - recomputed). "per_block": the block under jax.checkpoint saving nothing (only
# its input is kept; the whole block is recomputed; MAR's --grad_checkpointing, model.remat=True). "full": per_block,
# and the diffusion head's residual blocks rematerialised the same way (models/mar.py `MAR.head`): the head runs on
# diffusion_batch_mul x the tokens, the other large set of activations of a MAR training step.
REMAT_POLICIES = ("none", "dots_saveable", "per_block", "full")


def remat_policy_of(remat: bool | str) -> str:
    """A run_blocks `remat` argument as a REMAT_POLICIES name: True is "per_block", False "none"."""
    if remat is True or remat is False:
        return "per_block" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat policy must be one of {REMAT_POLICIES}, got {remat!r}")
    return remat


def checkpointed(module: nnx.Module, policy: str, *args, prevent_cse: bool = True, **kwargs):
    """`module(*args, **kwargs)` under jax.checkpoint with the saving rule of REMAT_POLICIES' `policy` (not "none").

    jax.checkpoint of a pure function of the module's parameters (merged inside), not nnx.remat of the module:
    nnx.remat writes the module's state back after the call, which flax refuses when the module was merged in an
    outer trace, e.g. from parameters closed over by a lax.scan body (the RL AR loop with rl.remat off). The modules
    carry no mutable state (dropout takes explicit keys), so nothing is lost. Keyword arguments are static unless
    they are arrays or pytrees of arrays (then they are traced arguments like *args). prevent_cse: jax.checkpoint's;
    False inside a scan body, which cannot be CSE'd with the forward pass anyway (the barriers it adds cost speed)."""
    save = jax.checkpoint_policies.dots_saveable if policy == "dots_saveable" else None
    graphdef, state = nnx.split(module)

    def call(state, args, kwargs):
        return nnx.merge(graphdef, state)(*args, **kwargs)
    static = {k: v for k, v in kwargs.items() if isinstance(v, (bool, str, int, float)) or v is None}
    dynamic = {k: v for k, v in kwargs.items() if k not in static}
    return jax.checkpoint(lambda st, a, kw: call(st, a, dict(kw, **static)), policy=save,
                          prevent_cse=prevent_cse)(state, args, dynamic)


def run_blocks(blocks, x: jax.Array, *, mask=None, rng=None, caches: list[KVCache] | None = None,
               cache_positions=None, remat: bool | str = False, return_kv: bool = False, scan: bool = False,
               remat_blocks: int = -1) -> tuple[jax.Array, list[KVCache] | None]:
    """Applies a stack of blocks; per-block keys come from `fold_in(rng, i)`; optional per-block remat (`remat`: a
    REMAT_POLICIES name, or True = "per_block" / False = "none"; "full" rematerialises each block as "per_block").
    remat_blocks (model.remat_blocks): only the first that many blocks run under the policy, the rest keep their
    activations (-1: all) - the memory / speed trade between "none" and a policy on every block.
    scan=True (model.scan_blocks): without caches, the blocks run as one jax.lax.scan over their stacked parameters
    (`scan_blocks`), so a program compiles one block body, not one per block.

    Returns (x, per-block caches): the updated caches when `caches` is given, each block's own keys/values when
    `return_kv`, else None."""
    policy = remat_policy_of(remat)
    if remat_blocks < -1:
        raise ValueError(f"remat_blocks must be >= 0 or -1 (all blocks), got {remat_blocks}")
    n_remat = len(blocks) if remat_blocks == -1 or policy == "none" else min(remat_blocks, len(blocks))
    if scan and caches is None and len(blocks) > 1:
        parts = [(0, n_remat, policy), (n_remat, len(blocks), "none")]
        kvs = []
        for lo, hi, p in parts:
            if hi > lo:
                x, kv = scan_blocks(blocks[lo:hi], x, mask=mask, rng=rng, remat=p, return_kv=return_kv, first=lo)
                kvs += kv or []
        return x, (kvs if return_kv else None)
    new_caches = [] if caches is not None or return_kv else None
    for i, block in enumerate(blocks):
        r = None if rng is None else jax.random.fold_in(rng, i)
        c = None if caches is None else caches[i]
        if policy != "none" and i < n_remat:
            x, c = checkpointed(block, policy, x, mask=mask, rng=r, cache=c, cache_positions=cache_positions,
                                return_kv=return_kv)
        else:
            x, c = block(x, mask=mask, rng=r, cache=c, cache_positions=cache_positions, return_kv=return_kv)
        if new_caches is not None:
            new_caches.append(c)
    return x, new_caches


def scan_blocks(blocks, x: jax.Array, *, mask=None, rng=None, remat: str = "none", return_kv: bool = False,
                first: int = 0) -> tuple[jax.Array, list[KVCache] | None]:
    """run_blocks as one jax.lax.scan: the blocks' parameters stacked along a leading axis inside the program (the
    model keeps one module per block, so parameter names, checkpoints and the reference converter are unchanged), the
    body one block with the step's parameters, key fold_in(rng, i) and remat policy. The same operations as the
    unrolled loop; XLA compiles the body once instead of once per block. `first`: the stack's index of blocks[0]
    (its keys are fold_in(rng, first + i), as in the loop, when a stack runs as two scans)."""
    graphdef, state0 = nnx.split(blocks[0])
    states = [state0] + [nnx.split(b)[1] for b in blocks[1:]]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)

    def body(x, inputs):
        state, i = inputs
        r = None if rng is None else jax.random.fold_in(rng, i)
        block = nnx.merge(graphdef, state)
        if remat != "none":
            return checkpointed(block, remat, x, mask=mask, rng=r, return_kv=return_kv, recompute_elementwise=True)
        return block(x, mask=mask, rng=r, return_kv=return_kv, recompute_elementwise=True)

    x, kv = jax.lax.scan(body, x, (stacked, jnp.arange(first, first + len(blocks), dtype=jnp.uint32)))
    return x, ([jax.tree.map(lambda a, i=i: a[i], kv) for i in range(len(blocks))] if return_kv else None)
