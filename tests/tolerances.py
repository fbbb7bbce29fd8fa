"""Numerical tolerances of the suite, derived from float32 arithmetic (docs/testing.md has the table of uses).

Two programs that compute the same float32 expression - remat or not, cached or uncached, sharded or not, jit or
eager, padded or not, this machine's ISA or another's (`--xla_cpu_max_isa`), torch (the reference fixture) or JAX -
round differently: XLA reorders and splits reductions (vector width, tiling, partial sums per device), contracts
a*b+c into one FMA or not, and each math library evaluates exp/tanh/erf to within a few ulps of its own. Neither
result is "the" answer, so bit equality between them is not a property of the code under test.

The rule. A sum or dot product of n terms in any order carries |fl(s) - s| <= gamma_n * sum|terms| with
gamma_n = n*u / (1 - n*u), u = eps/2 (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 3.5).
A computation is a chain of such steps; to first order the bounds of the steps on the longest dependency chain
add up. With `depth` = the number of roundings on that chain - a reduction of n terms counts n, an elementwise
operation 1, a transcendental (exp, tanh, erf, log, rsqrt) `ULP_TRANSCENDENTAL` - each program is within
depth*u*scale of exact arithmetic and two programs are within

    atol = depth * eps * scale                                               (= 2 * gamma_depth * scale, 1st order)

of each other, where `scale` is the magnitude of the terms: the largest |value| of the compared array (per leaf of
a gradient tree). Scaling by the array's magnitude, not by each element, is what makes the bound hold for elements
that are near zero from cancellation (a per-element relative tolerance fails there on some machine sooner or
later). This is a worst-case bound: the errors seen are ~10-1000x smaller, and a real bug (wrong sign, a missing
term, a dropped block, an off-by-one position) moves values by a sizeable fraction of `scale`, far above it.

Exact comparisons stay exact where they are guaranteed: the same compiled program run twice on the same inputs,
integer / boolean outputs of exact computations, copies, casts and checkpoint round trips, and a deterministic
sampler against itself.
"""
from __future__ import annotations

import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)   # 2**-23: spacing of float32 at 1 (unit roundoff u = EPS32 / 2)
EPS16 = float(2.0 ** -7)                   # bfloat16: 8 significand bits
# Libraries' exp/tanh/erf/log are accurate to a few ulps (XLA's CPU polynomials and glibc/MKL are <= 4 ulp); a
# transcendental counts as that many roundings in `depth`.
ULP_TRANSCENDENTAL = 4


def reassociation_atol(depth: float, scale: float, eps: float = EPS32) -> float:
    """Bound on |x_A - x_B| for two evaluations of the same expression whose longest chain has `depth` roundings
    over terms of magnitude `scale` (module docstring)."""
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


def max_abs(x) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64)))) if np.size(x) else 0.0


def assert_close_to_scale(actual, desired, depth: float, *, scale: float | None = None, eps: float = EPS32,
                          err_msg: str = ""):
    """|actual - desired| <= reassociation_atol(depth, scale) elementwise, scale = max|desired| unless given."""
    desired = np.asarray(desired, np.float64)
    actual = np.asarray(actual, np.float64)
    s = max_abs(desired) if scale is None else scale
    np.testing.assert_allclose(actual, desired, rtol=0, atol=reassociation_atol(depth, s, eps), err_msg=err_msg)


def assert_trees_close(actual, desired, depth: float, *, eps: float = EPS32):
    """assert_close_to_scale on every leaf of two pytrees of one structure, each leaf on its own max|leaf| scale."""
    a_leaves, a_tree = jax.tree_util.tree_flatten(actual)
    d_leaves, d_tree = jax.tree_util.tree_flatten(desired)
    assert a_tree == d_tree, (a_tree, d_tree)
    assert len(d_leaves) > 0
    for i, (a, d) in enumerate(zip(a_leaves, d_leaves)):
        assert_close_to_scale(a, d, depth, eps=eps, err_msg=f"leaf {i} of {len(d_leaves)}")
