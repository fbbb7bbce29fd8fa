"""MAR (Li et al. 2024): MAE-style encoder-decoder over continuous tokens + per-token diffusion head.

Numerically the reference `models/mar.py`: buffer rows holding the (possibly dropped) class embedding, learned
position embeddings, LayerNorm after the position add, a fully sparse encoder over buffer + visible tokens, a
decoder over all positions with mask tokens, and a diffusion position embedding.

Static shapes. The reference drops masked tokens, so the encoder length varies. Here the kept positions (buffer +
visible, in original order) are gathered to the front with a stable argsort and padded to a STATIC length
`enc_len`; padding keys are masked out of attention, which is exact (softmax weight 0) and equal to the reference
up to float summation order. Callers pick `enc_len`: training uses one length, buffer + S - ceil(S * min_ratio);
samplers use a few buckets (see marval_jax/sampling/schedule.py). So training compiles one program and a sampler
one loop body per bucket, never one per visible-token count.

Attention (`MARConfig.attention`). "bidirectional" is the reference. "causal" is causal in generation order: the
sampler generates each order from its END backwards, so a position's generation rank is gen_rank = S - 1 -
(index in the order), lower = generated earlier; buffer rows have rank -1. A query may attend to key k iff
k is kept (buffer or visible) and (the query is a mask token or gen_rank(k) <= gen_rank(query)), or k is the query
itself. So a visible token never sees a token generated after it, its keys/values never change in later AR steps,
and a KV cache reproduces uncached sampling exactly (marval_jax/sampling/cached_sampler.py, docs/kv_cache.md).
Causal calls need `gen_rank` (B, S).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from marval_jax.models.diffusion_head import SimpleMLPAdaLN, timestep_embedding
from marval_jax.models.transformer import (ATTENTION_IMPLS, KERNELS, REMAT_POLICIES, Block, checkpointed, dense,
                                           init_kv_cache, layer_norm, run_blocks)


ATTENTION_MODES = ("bidirectional", "causal")
# Per-block key/value caches of encoder and decoder: {"encoder": [{"k", "v"}], "decoder": [...]}, each
# (B, L, heads, hd) in the (buffer + S) layout plus one scratch row (`init_cache`).
Cache = dict[str, list[dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class MARConfig:
    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    vae_embed_dim: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    decoder_embed_dim: int = 768
    decoder_depth: int = 12
    decoder_num_heads: int = 12
    mlp_ratio: float = 4.0
    buffer_size: int = 64
    class_num: int = 1000
    diffloss_d: int = 6
    diffloss_w: int = 1024
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    label_drop_prob: float = 0.1
    dtype: str = "float32"
    remat: bool = False  # rematerialise each transformer block (MAR's --grad_checkpointing); see remat_policy
    # what a training step keeps for its backward pass (models/transformer.py REMAT_POLICIES): "none",
    # "dots_saveable", "per_block" or "full"; "" follows `remat` (True: "per_block", False: "none")
    remat_policy: str = ""
    # how many blocks of each stack (encoder, decoder; from the input side) run under remat_policy; -1: all. The
    # policy on a few blocks trades a little speed for the memory a batch needs (docs/benchmarks.md, round two)
    remat_blocks: int = -1
    # the encoder's and the decoder's blocks as one jax.lax.scan each over their stacked parameters (full passes:
    # training, uncached sampling); the parameters stay one module per block (names, checkpoints unchanged)
    scan_blocks: bool = False
    attention: str = "bidirectional"  # "bidirectional" (the reference) | "causal" (in generation order, cacheable)
    # how attention is computed (not what it computes): "xla" (the reference's numerics), "cudnn" (fused flash
    # attention, GPU bf16 only), "flash" (the Pallas flash attention with in-kernel dropout, GPU only) or "auto"
    # (transformer.auto_attention_impl: cudnn where it can run - GPU, bf16/fp16, no attention dropout -, flash for
    # GPU bf16/fp16 training with attention dropout, else xla)
    attention_impl: str = "auto"
    # how a block computes LayerNorm -> Linear (models/transformer.py KERNELS): "xla" (the reference), "pallas" (one
    # fused Pallas kernel per pair, GPU only; docs/kernels.md) or "pallas_interpret" (the same in Pallas' interpreter)
    kernels: str = "xla"

    def __post_init__(self):
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"MARConfig.attention must be one of {', '.join(ATTENTION_MODES)}, got "
                             f"{self.attention!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"MARConfig.attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, got "
                             f"{self.attention_impl!r}")
        if self.kernels not in KERNELS:
            raise ValueError(f"MARConfig.kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        if not isinstance(self.remat_blocks, int) or self.remat_blocks < -1:
            raise ValueError(f"MARConfig.remat_blocks must be an integer >= 0 or -1 (all blocks), got "
                             f"{self.remat_blocks!r}")
        if self.remat_policy not in ("",) + REMAT_POLICIES:
            raise ValueError(f"MARConfig.remat_policy must be one of {', '.join(REMAT_POLICIES)} (or '' to follow "
                             f"MARConfig.remat), got {self.remat_policy!r}")

    @property
    def remat_mode(self) -> str:
        """The effective remat policy: remat_policy, or ("per_block" if remat else "none") when it is ""."""
        return self.remat_policy or ("per_block" if self.remat else "none")

    @property
    def grid(self) -> int:
        return self.img_size // self.vae_stride // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.grid ** 2

    @property
    def token_dim(self) -> int:
        return self.vae_embed_dim * self.patch_size ** 2

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MARConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_reference_json(cls, text: str) -> "MARConfig":
        """From a fixture's `config_json` (the reference's argparse names)."""
        return cls.from_dict(json.loads(text))


def _param(rngs: nnx.Rngs, shape, std=0.02):
    return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32) * std)


def patchify(x: jax.Array, p: int) -> jax.Array:
    """(B, C, H, W) latents -> (B, (H/p)(W/p), C p p) tokens, channel order (c, p, q) as the reference."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return jnp.einsum("nchpwq->nhwcpq", x).reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(x: jax.Array, p: int, c: int) -> jax.Array:
    b, s, _ = x.shape
    g = int(round(math.sqrt(s)))
    x = x.reshape(b, g, g, c, p, p)
    return jnp.einsum("nhwcpq->nchpwq", x).reshape(b, c, g * p, g * p)


def _pos_rows(table: jax.Array, positions: jax.Array) -> jax.Array:
    """A learned (1, N, D) position table at (B, P) indices."""
    return jnp.take(table[0], positions, axis=0)


def cache_len(cfg: "MARConfig") -> int:
    """Cache rows: buffer + S positions of the model layout, plus one scratch row that padded query rows write to
    and no query attends to."""
    return cfg.buffer_size + cfg.seq_len + 1


def init_cache(cfg: "MARConfig", batch: int) -> Cache:
    """Zero caches for `batch` rows (2B with classifier-free guidance: conditional then unconditional half)."""
    n = cache_len(cfg)
    return {
        "encoder": [init_kv_cache(batch, n, cfg.encoder_num_heads, cfg.encoder_embed_dim // cfg.encoder_num_heads,
                                  cfg.jnp_dtype) for _ in range(cfg.encoder_depth)],
        "decoder": [init_kv_cache(batch, n, cfg.decoder_num_heads, cfg.decoder_embed_dim // cfg.decoder_num_heads,
                                  cfg.jnp_dtype) for _ in range(cfg.decoder_depth)],
    }


def kept_positions(mask: jax.Array, buffer_size: int, enc_len: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Indices (B, enc_len) of buffer + visible positions in original order (padded), their validity, and the
    full keep map (B, Bf + S). mask: (B, S), 1 = masked."""
    keep = jnp.concatenate([jnp.ones((mask.shape[0], buffer_size), bool), mask < 0.5], axis=1)
    idx = jnp.argsort(~keep, axis=1, stable=True)[:, :enc_len]
    return idx, jnp.take_along_axis(keep, idx, axis=1), keep


def gen_rank_from_orders(orders: jax.Array) -> jax.Array:
    """Generation rank (B, S) of each position: S - 1 - its index in the order (the order is generated from its end
    backwards, as the sampler and the training mask do), so lower = generated earlier."""
    return orders.shape[1] - 1 - jnp.argsort(orders, axis=1).astype(jnp.int32)


def layout_rank(gen_rank: jax.Array, buffer_size: int) -> jax.Array:
    """Generation rank in the (buffer + S) layout: -1 for buffer rows, then gen_rank (B, Bf + S) int32."""
    buf = jnp.full((gen_rank.shape[0], buffer_size), -1, jnp.int32)
    return jnp.concatenate([buf, gen_rank.astype(jnp.int32)], axis=1)


def causal_mask(q_rank: jax.Array, k_rank: jax.Array, k_kept: jax.Array, q_masked: jax.Array,
                self_attend: jax.Array | None = None) -> jax.Array:
    """Attention mask (B, 1, Tq, Tk) of the causal-in-generation-order rule:
    allowed(q, k) = k_kept(k) and (q_masked(q) or rank(k) <= rank(q)), or self_attend(q, k).

    q_rank (B, Tq), k_rank (B, Tk) in the layout_rank convention; k_kept (B, Tk) bool; q_masked (B, Tq) bool (mask
    token queries); self_attend (B, Tq, Tk) bool or None."""
    allowed = k_kept[:, None, :] & (q_masked[:, :, None] | (k_rank[:, None, :] <= q_rank[:, :, None]))
    if self_attend is not None:
        allowed = allowed | self_attend
    return allowed[:, None]


class MAR(nnx.Module):
    def __init__(self, cfg: MARConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = cfg.jnp_dtype
        de, dd, s, bf = cfg.encoder_embed_dim, cfg.decoder_embed_dim, cfg.seq_len, cfg.buffer_size
        drop = dict(attn_drop=cfg.attn_dropout, proj_drop=cfg.proj_dropout, attention_impl=cfg.attention_impl,
                    kernels=cfg.kernels)
        self.class_emb = nnx.Embed(cfg.class_num, de, embedding_init=nnx.initializers.normal(0.02),
                                   param_dtype=jnp.float32, rngs=rngs)
        self.fake_latent = _param(rngs, (1, de))
        self.z_proj = dense(cfg.token_dim, de, rngs=rngs, dtype=dt)
        self.z_proj_ln = layer_norm(de, rngs=rngs, dtype=dt)
        self.encoder_pos_embed_learned = _param(rngs, (1, s + bf, de))
        self.encoder_blocks = nnx.List([Block(de, cfg.encoder_num_heads, cfg.mlp_ratio, rngs=rngs, dtype=dt, **drop)
                                        for _ in range(cfg.encoder_depth)])
        self.encoder_norm = layer_norm(de, rngs=rngs, dtype=dt)
        self.decoder_embed = dense(de, dd, rngs=rngs, dtype=dt)
        self.mask_token = _param(rngs, (1, 1, dd))
        self.decoder_pos_embed_learned = _param(rngs, (1, s + bf, dd))
        self.decoder_blocks = nnx.List([Block(dd, cfg.decoder_num_heads, cfg.mlp_ratio, rngs=rngs, dtype=dt, **drop)
                                        for _ in range(cfg.decoder_depth)])
        self.decoder_norm = layer_norm(dd, rngs=rngs, dtype=dt)
        self.diffusion_pos_embed_learned = _param(rngs, (1, s, dd))
        self.diffloss_net = SimpleMLPAdaLN(cfg.token_dim, cfg.diffloss_w, dd, cfg.diffloss_d, rngs=rngs, dtype=dt)

    # -- conditioning ------------------------------------------------------------------------------------------
    def class_embedding(self, labels: jax.Array | None, batch: int | None = None) -> jax.Array:
        """labels (B,) int -> (B, De); labels=None gives the null class (fake_latent) for `batch` rows."""
        if labels is None:
            return jnp.broadcast_to(self.fake_latent[...], (batch, self.cfg.encoder_embed_dim))
        return self.class_emb(labels)

    def drop_labels(self, class_emb: jax.Array, rng: jax.Array) -> jax.Array:
        """Training label dropout: each row becomes fake_latent with probability label_drop_prob."""
        drop = jax.random.uniform(rng, class_emb.shape[:1]) < self.cfg.label_drop_prob
        return jnp.where(drop[:, None], self.fake_latent[...], class_emb)

    # -- encoder / decoder -------------------------------------------------------------------------------------
    @property
    def causal(self) -> bool:
        return self.cfg.attention == "causal"

    def _layout_rank(self, gen_rank: jax.Array | None, batch: int) -> jax.Array | None:
        if not self.causal:
            return None
        s = self.cfg.seq_len
        if gen_rank is None:
            raise ValueError("MARConfig.attention='causal' needs gen_rank (B, S): each position's generation rank, "
                             "e.g. marval_jax.models.mar.gen_rank_from_orders(orders)")
        if gen_rank.shape != (batch, s):
            raise ValueError(f"gen_rank must have shape (B, S) = {(batch, s)}, got {gen_rank.shape}")
        return layout_rank(gen_rank, self.cfg.buffer_size)

    def encoder_inputs(self, tokens: jax.Array, class_emb: jax.Array) -> jax.Array:
        """Embedded encoder inputs of every row in the (buffer + S) layout, before gathering: (B, Bf + S, De)."""
        cfg = self.cfg
        b = tokens.shape[0]
        x = self.z_proj(tokens)
        buf = jnp.broadcast_to(class_emb[:, None, :].astype(x.dtype), (b, cfg.buffer_size, x.shape[-1]))
        x = jnp.concatenate([buf, x], axis=1) + self.encoder_pos_embed_learned[...].astype(x.dtype)
        return self.z_proj_ln(x)

    def encode(self, tokens: jax.Array | None, mask: jax.Array | None, class_emb: jax.Array, *,
               enc_len: int | None = None, rng: jax.Array | None = None, gen_rank: jax.Array | None = None,
               return_kv: bool = False, positions: jax.Array | None = None, cache: Cache | None = None,
               cache_positions: jax.Array | None = None, attn_mask: jax.Array | None = None):
        """The encoder, in one of two modes.

        Full pass (positions None): tokens (B, S, C), mask (B, S) 1 = masked. Returns (encoder output (B, enc_len,
        De) with padding rows, keep map (B, Bf+S), valid (B, enc_len)), plus the per-block keys/values
        [{"k", "v"} (B, enc_len, H, hd)] when `return_kv`.

        Rows against a cache (positions (B, P) in the (buffer + S) layout): tokens (B, P, C) are the rows at
        `positions` (None: all are buffer rows, which hold class_emb (B, De)); mask is unused. The rows attend to the
        cache's keys under attn_mask (B, 1, P, L) after writing their own at cache_positions (B, P). Returns
        (encoder output (B, P, De), cache with its "encoder" entries updated)."""
        if positions is not None:
            return self._encode_rows(tokens, class_emb, positions, cache, cache_positions, attn_mask)
        cfg = self.cfg
        lrank = self._layout_rank(gen_rank, tokens.shape[0])
        x = self.encoder_inputs(tokens, class_emb)
        idx, valid, keep = kept_positions(mask, cfg.buffer_size, enc_len)
        x = jnp.take_along_axis(x, idx[:, :, None], axis=1)
        if lrank is None:
            attn_mask = valid[:, None, None, :]
        else:  # padding rows are queries like mask tokens (their output is never used)
            r = jnp.take_along_axis(lrank, idx, axis=1)
            attn_mask = causal_mask(r, r, valid, ~valid)
        x, kv = run_blocks(self.encoder_blocks, x, mask=attn_mask, rng=rng, remat=cfg.remat_mode, return_kv=return_kv,
                           scan=cfg.scan_blocks, remat_blocks=cfg.remat_blocks)
        out = (self.encoder_norm(x), keep, valid)
        return out + (kv,) if return_kv else out

    def _encode_rows(self, tokens, class_emb, positions, cache, cache_positions, attn_mask):
        dt = self.cfg.jnp_dtype
        if tokens is None:  # buffer rows
            x = jnp.broadcast_to(class_emb[:, None, :].astype(dt), positions.shape + (class_emb.shape[-1],))
        else:
            x = self.z_proj(tokens)
        x = self.z_proj_ln(x + _pos_rows(self.encoder_pos_embed_learned[...], positions).astype(x.dtype))
        x, enc = run_blocks(self.encoder_blocks, x, mask=attn_mask, caches=cache["encoder"],
                            cache_positions=cache_positions)
        return self.encoder_norm(x), dict(cache, encoder=enc)

    def decode(self, enc_out: jax.Array | None, keep: jax.Array | None, *, rng: jax.Array | None = None,
               gen_rank: jax.Array | None = None, return_kv: bool = False, positions: jax.Array | None = None,
               cache: Cache | None = None, cache_positions: jax.Array | None = None,
               attn_mask: jax.Array | None = None):
        """The decoder, in one of two modes.

        Full pass (positions None): scatter encoder rows back, fill mask tokens, decoder blocks; returns the head
        condition (B, S, Dd), plus the per-block keys/values [{"k", "v"} (B, Bf+S, H, hd)] when `return_kv`.

        Rows against a cache (positions (B, P) in the layout): enc_out (B, P, De) are the encoder outputs of those
        rows (None: mask-token queries); keep is unused. Returns (head condition (B, P, Dd) - meaningful for token
        positions, not buffer rows - and the cache with its "decoder" entries updated at cache_positions)."""
        if positions is not None:
            return self._decode_rows(enc_out, positions, cache, cache_positions, attn_mask)
        cfg = self.cfg
        lrank = self._layout_rank(gen_rank, enc_out.shape[0])
        x = self.decoder_embed(enc_out)
        rank = jnp.clip(jnp.cumsum(keep, axis=1) - 1, 0, x.shape[1] - 1)  # position of each kept row in enc_out
        gathered = jnp.take_along_axis(x, rank[:, :, None], axis=1)
        x = jnp.where(keep[:, :, None], gathered, self.mask_token[...].astype(x.dtype))
        x = x + self.decoder_pos_embed_learned[...].astype(x.dtype)
        attn_mask = None
        if lrank is not None:
            eye = jnp.eye(keep.shape[1], dtype=bool)[None]
            attn_mask = causal_mask(lrank, lrank, keep, ~keep, eye)
        x, kv = run_blocks(self.decoder_blocks, x, mask=attn_mask, rng=rng, remat=cfg.remat_mode, return_kv=return_kv,
                           scan=cfg.scan_blocks, remat_blocks=cfg.remat_blocks)
        x = self.decoder_norm(x)[:, cfg.buffer_size:]
        x = x + self.diffusion_pos_embed_learned[...].astype(x.dtype)
        return (x, kv) if return_kv else x

    def _decode_rows(self, enc_rows, positions, cache, cache_positions, attn_mask):
        if enc_rows is None:  # mask-token queries
            x = jnp.broadcast_to(self.mask_token[...], positions.shape + (self.mask_token.shape[-1],))
            x = x.astype(self.cfg.jnp_dtype)
        else:
            x = self.decoder_embed(enc_rows)
        x = x + _pos_rows(self.decoder_pos_embed_learned[...], positions).astype(x.dtype)
        x, dec = run_blocks(self.decoder_blocks, x, mask=attn_mask, caches=cache["decoder"],
                            cache_positions=cache_positions)
        x = self.decoder_norm(x)
        spos = jnp.maximum(positions - self.cfg.buffer_size, 0)
        return x + _pos_rows(self.diffusion_pos_embed_learned[...], spos).astype(x.dtype), dict(cache, decoder=dec)

    def condition(self, tokens: jax.Array, mask: jax.Array, class_emb: jax.Array, *, enc_len: int,
                  rng: jax.Array | None = None, gen_rank: jax.Array | None = None) -> jax.Array:
        """Encoder + decoder: per-token condition z (B, S, Dd) for the head. `gen_rank` (B, S) is required when
        attention == "causal" (ignored otherwise)."""
        r_enc, r_dec = (None, None) if rng is None else jax.random.split(rng)
        enc, keep, _ = self.encode(tokens, mask, class_emb, enc_len=enc_len, rng=r_enc, gen_rank=gen_rank)
        return self.decode(enc, keep, rng=r_dec, gen_rank=gen_rank)

    def head(self, x: jax.Array, t: jax.Array, z: jax.Array) -> jax.Array:
        """The diffusion head: x (N, C) noisy tokens, t (N,), z (N, Dd) -> (N, 2C). Under remat policy "full" its
        residual blocks are rematerialised one by one (the same operations as SimpleMLPAdaLN.__call__)."""
        if self.cfg.remat_mode != "full":
            return self.diffloss_net(x, t, z)
        net = self.diffloss_net
        temb = net.time_embed_2(jax.nn.silu(net.time_embed_0(timestep_embedding(t))))
        y = temb + net.cond_embed(z)
        h = net.input_proj(x)
        for block in net.res_blocks:
            h = checkpointed(block, "full", h, y)
        return net.final_layer(h, y).astype(jnp.float32)


# The released checkpoints (ImageNet 256, KL-16 latents): MAR-B / L / H with their released heads.
IMAGENET_256 = dict(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, buffer_size=64, class_num=1000)
RELEASED_SIZES = {
    "base": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, decoder_embed_dim=768,
                 decoder_depth=12, decoder_num_heads=12, diffloss_d=6, diffloss_w=1024),
    "large": dict(encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16, decoder_embed_dim=1024,
                  decoder_depth=16, decoder_num_heads=16, diffloss_d=8, diffloss_w=1280),
    "huge": dict(encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16, decoder_embed_dim=1280,
                 decoder_depth=20, decoder_num_heads=16, diffloss_d=12, diffloss_w=1536),
}
# The embedded default's MAR (configs/mar.py:fmnist_l, docs/reproduction.md): Fashion-MNIST padded to 32x32, 4x4
# pixel patches -> 64 tokens of 16 values; also a model of the benchmark suite (`--models fmnist_l`), where its
# batch-1 sampler breakdown bounds the one-step speed-up (docs/results.md).
FMNIST_L = dict(img_size=32, vae_stride=4, patch_size=1, vae_embed_dim=16, buffer_size=16, class_num=10,
                encoder_embed_dim=256, encoder_depth=4, encoder_num_heads=8, decoder_embed_dim=256, decoder_depth=4,
                decoder_num_heads=8, diffloss_d=6, diffloss_w=384)


def train_encoder_len(cfg: MARConfig, mask_ratio_min: float) -> int:
    """Static encoder length for training: buffer + the most visible tokens a batch can have."""
    return cfg.buffer_size + cfg.seq_len - int(math.ceil(cfg.seq_len * mask_ratio_min))


# Logical axes per parameter path (regex on "a/b/c"), resolved to mesh axes by marval_jax.parallel.sharding.
LOGICAL_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r".*/(qkv|fc1)/kernel", ("embed", "mlp")),
    (r".*/(qkv|fc1)/bias", ("mlp",)),
    (r".*/(proj|fc2)/kernel", ("mlp", "embed")),
    (r"class_emb/embedding", ("vocab", "embed")),
    (r".*pos_embed_learned", (None, None, "embed")),
    (r"(z_proj|decoder_embed)/kernel", (None, "embed")),
    (r"diffloss_net/.*(mlp_0|mlp_2|adaLN_modulation_1|cond_embed|time_embed_2)/kernel", ("embed", "mlp")),
]
