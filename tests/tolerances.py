"""Numerical tolerances of the suite. The rule, the constants and the depth counters live in
marval_jax/numerics.py (one source of truth: the parity tool uses them too) and are re-exported here;
this module adds the assertion helpers and the depth of the test-only classifier. docs/testing.md has the
table of uses.
"""
from __future__ import annotations

import jax
import numpy as np

from marval_jax.numerics import (EPS16, EPS32, LAMBDA, ULP_TRANSCENDENTAL, mar_depth, mar_depth_parts,  # noqa: F401
                                 reassociation_atol, transformer_depth, vae_depth, worst_case_atol)


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


def classifier_depth(channels=(32, 64, 128), hidden: int = 256, num_classes: int = 10, *, log_softmax: bool = False,
                     side: int = 28) -> int:
    """Roundings on the longest chain of models/classifier.Classifier: per conv a 3x3 reduction over the input
    channels (9*c_in terms), ReLU and 2x2 max pool (exact); the hidden layer over side'^2 * c_last features, the
    head over `hidden`. With log_softmax: max (exact), exp, a sum over the classes, log, a subtraction."""
    depth, c_in = 0, 1
    for c in channels:
        depth += 9 * c_in + 1
        c_in, side = c, side // 2
    depth += side * side * c_in + 1 + hidden + 1
    if log_softmax:
        depth += 2 * ULP_TRANSCENDENTAL + num_classes + 1
    return depth


def clip_depth(width: int, intermediate: int, layers: int, heads: int, seq: int, embed_terms: int,
               proj_dim: int, *, score: bool = False) -> int:
    """Roundings on the longest chain of one CLIP tower (models/clip.py): the embedding (`embed_terms`: the patch
    conv's patch*patch*3 terms for the vision tower, 1 for the text tower's lookup) plus the position add, the
    pre-LayerNorm, `layers` pre-LN transformer blocks of `width` over `seq` tokens (transformer_depth, MLP ratio
    intermediate / width; quick_gelu's sigmoid counted as the GELU), the final LayerNorm and the projection to
    `proj_dim`. With score: the cosine / PickScore after it (two norms and a dot of proj_dim terms, two sqrt, two
    divides, exp of the logit scale, the product)."""
    depth = (embed_terms + 1 + 2 * (2 * width + 3)
             + transformer_depth(width, seq, layers, heads=heads, mlp_ratio=intermediate / width) + width)
    if score:
        depth += 3 * proj_dim + 3 * ULP_TRANSCENDENTAL + 6
    return depth
