"""Float32 rounding bounds shared by the parity tool (marval_jax/tools/parity.py) and the test suite
(tests/tolerances.py re-exports everything here; docs/testing.md has the table of uses).

Two programs that compute the same float32 expression - remat or not, cached or uncached, sharded or not, jit or
eager, padded or not, this machine's ISA or another's (`--xla_cpu_max_isa`), torch (the reference fixture) or JAX -
round differently: XLA reorders and splits reductions (vector width, tiling, partial sums per device), contracts
a*b+c into one FMA or not, and each math library evaluates exp/tanh/erf to within a few ulps of its own. Neither
result is "the" answer, so bit equality between them is not a property of the code under test.

The rule. A sum or dot product of n terms in any order carries |fl(s) - s| <= gamma_n * sum|terms| with
gamma_n = n*u / (1 - n*u), u = eps/2 (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 3.5).
A computation is a chain of such steps; to first order the errors of the steps on the longest dependency chain add
up. Let `depth` = the number of roundings on that chain - a reduction of n terms counts n, an elementwise operation
1, a transcendental (exp, tanh, erf, log, rsqrt) `ULP_TRANSCENDENTAL` - and `scale` the magnitude of the terms: the
largest |value| of the compared array (per leaf of a gradient tree).

  worst case   |x - exact| <= depth * u * scale. Guaranteed, but for the suite's nets (depth 10^3 - 10^5) it allows
               10^-4 - 10^-2 of the scale, blind to real parity bugs (a biased vs unbiased variance over 4096
               values moves outputs by 1e-4).
  probabilistic (used)  rounding errors are independent and mean-zero, so they add like a random walk:
               |x - exact| <= LAMBDA * sqrt(depth) * u * scale with probability >= 1 - 2 exp(-LAMBDA^2 / 2)
               (Higham & Mary, "A New Approach to Probabilistic Rounding Error Analysis", SIAM J. Sci. Comput. 41(5),
               2019, Thm 2.4 / 3.1). LAMBDA = 8: a failure probability below 3e-14 per element.

Two programs are each within that of exact arithmetic, so they are within twice it of each other:

    atol = LAMBDA * sqrt(depth) * eps * scale                 (= 2 * LAMBDA * sqrt(depth) * u * scale)

Scaling by the array's magnitude, not by each element, is what makes the bound hold for elements that are near
zero from cancellation (a per-element relative tolerance fails there on some machine sooner or later). The errors
seen on this machine at four ISAs are 10-100x below the bound (docs/testing.md), and a real bug (wrong sign, a
missing term, a dropped block, an off-by-one position) moves values by a sizeable fraction of `scale`, far above.

Exact comparisons stay exact where they are guaranteed: the same compiled program run twice on the same inputs,
integer / boolean outputs of exact computations, copies, casts and checkpoint round trips, and a deterministic
sampler against itself.
"""
from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)   # 2**-23: spacing of float32 at 1 (unit roundoff u = EPS32 / 2)
EPS16 = float(2.0 ** -7)                   # bfloat16: 8 significand bits
# Libraries' exp/tanh/erf/log are accurate to a few ulps (XLA's CPU polynomials and glibc/MKL are <= 4 ulp); a
# transcendental counts as that many roundings in `depth`.
ULP_TRANSCENDENTAL = 4


LAMBDA = 8.0


def reassociation_atol(depth: float, scale: float, eps: float = EPS32) -> float:
    """Bound on |x_A - x_B| for two evaluations of the same expression whose longest chain has `depth` roundings
    over terms of magnitude `scale` (module docstring: the probabilistic bound, both programs)."""
    return LAMBDA * float(np.sqrt(depth)) * eps * float(scale)


def worst_case_atol(depth: float, scale: float, eps: float = EPS32) -> float:
    """The guaranteed first-order bound depth * eps * scale (both programs), for reference and short chains."""
    return float(depth) * eps * float(scale)


def transformer_depth(dim: int, seq: int, blocks: int, *, heads: int = 1, mlp_ratio: float = 4.0,
                      grad: bool = False, tokens: int = 0) -> int:
    """Roundings on the longest chain through `blocks` pre-LN ViT blocks (models/transformer.Block) of width `dim`
    over `seq` keys. Per block: 2 LayerNorms (mean and variance reductions of dim, then normalise: 2*dim + 3 each),
    qkv (dim), q.k (dim/heads), softmax (exp + sum over seq + divide), attention x v (seq), projection (dim),
    fc1 (dim), GELU (erf), fc2 (mlp_ratio*dim), two residual adds.
    With grad=True: the backward pass runs the same chain in reverse with the transposed reductions (x2), and a
    weight gradient adds one reduction over the `tokens` (batch x positions) it sums."""
    hidden = int(mlp_ratio * dim)
    per_block = (2 * (2 * dim + 3) + dim + dim // heads + (ULP_TRANSCENDENTAL + seq + 1) + seq + dim + dim
                 + ULP_TRANSCENDENTAL + hidden + 2)
    fwd = blocks * per_block
    return 3 * fwd + tokens if grad else fwd


def mar_depth(cfg, *, grad: bool = False, tokens: int = 0) -> int:
    """Roundings on the longest chain of a MAR forward (models/mar.MAR, `cfg` a MARConfig): the encoder and decoder
    stacks over buffer + seq keys (each with its final LayerNorm and input projection), then the diffusion head
    (models/diffloss): the input and condition projections, the time embedding (256 frequencies, two linears),
    diffloss_d residual blocks of width w (LayerNorm, adaLN modulation linear, SiLU, two linears, SiLU, residual)
    and the final adaLN layer. grad / tokens as in transformer_depth."""
    keys = cfg.buffer_size + cfg.seq_len
    w = cfg.diffloss_w
    enc = transformer_depth(cfg.encoder_embed_dim, keys, cfg.encoder_depth, heads=cfg.encoder_num_heads,
                            mlp_ratio=cfg.mlp_ratio) + cfg.token_dim + 2 * cfg.encoder_embed_dim + 3
    dec = transformer_depth(cfg.decoder_embed_dim, keys, cfg.decoder_depth, heads=cfg.decoder_num_heads,
                            mlp_ratio=cfg.mlp_ratio) + cfg.encoder_embed_dim + 2 * cfg.decoder_embed_dim + 3
    res_block = (2 * w + 3) + w + ULP_TRANSCENDENTAL + w + ULP_TRANSCENDENTAL + w + 2
    head = (cfg.token_dim + cfg.decoder_embed_dim + 256 + ULP_TRANSCENDENTAL + 2 * w
            + cfg.diffloss_d * res_block + (2 * w + 3) + 2 * w)
    fwd = enc + dec + head
    return 3 * fwd + tokens if grad else fwd


def mar_depth_parts(cfg) -> dict[str, int]:
    """The three chains of mar_depth on their own: `encoder` (input projection, encoder blocks, final LayerNorm),
    `decoder` (encoder and then decoder: what decode(encode(x)) runs) and `head` (the diffusion head alone, from
    given conditions). mar_depth(cfg) = decoder + head."""
    total = mar_depth(cfg)
    keys = cfg.buffer_size + cfg.seq_len
    enc = transformer_depth(cfg.encoder_embed_dim, keys, cfg.encoder_depth, heads=cfg.encoder_num_heads,
                            mlp_ratio=cfg.mlp_ratio) + cfg.token_dim + 2 * cfg.encoder_embed_dim + 3
    dec = transformer_depth(cfg.decoder_embed_dim, keys, cfg.decoder_depth, heads=cfg.decoder_num_heads,
                            mlp_ratio=cfg.mlp_ratio) + cfg.encoder_embed_dim + 2 * cfg.decoder_embed_dim + 3
    return {"encoder": enc, "decoder": enc + dec, "head": total - enc - dec}


def vae_depth(ch: int, ch_mult, img: int, *, num_res_blocks: int = 2, decoder: bool = False) -> int:
    """Roundings on the longest chain of models/vae.AutoencoderKL's encoder (or decoder) on img x img inputs:
    per level (width ch*mult, side s) num_res_blocks ResnetBlocks (+1 in the decoder) of GroupNorm (32 groups: mean
    and variance over s*s*width/32 values), SiLU, 3x3 conv (9*width terms), twice, and the residual; a 3x3 resampling
    conv between levels; the middle (two ResnetBlocks and an attention over s*s positions); GroupNorm, SiLU and
    the output conv."""
    def res(width, side):
        gn = 2 * (side * side * width // 32) + 3
        return 2 * (gn + ULP_TRANSCENDENTAL + 9 * width) + 1

    depth, side = 9 * 3, img
    widths = [ch * m for m in ch_mult]
    for i, w in enumerate(widths):
        depth += (num_res_blocks + int(decoder)) * res(w, side) + 9 * w
        side = side // 2 if i < len(widths) - 1 else side
    w = widths[-1]
    depth += 2 * res(w, side) + (2 * (side * side * w // 32) + 3) + w + w + ULP_TRANSCENDENTAL + 2 * side * side + w
    depth += 2 * (side * side * w // 32) + 3 + ULP_TRANSCENDENTAL + 9 * w
    return depth
