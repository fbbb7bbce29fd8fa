"""KV-cached sampling (marval_jax/sampling/cached_sampler.py) against the uncached sampler, float32, tiny models.

A tiny MAR (S = 16, two blocks each so cached keys of layer 2 depend on cached layer-1 outputs) with its parameters
perturbed: the diffusion head is zero at init, which would make every sampler's output ignore the transformer.
The untrained teacher chain grows to ~1e5, so the teacher comparisons are relative (rel_err, max-abs normalised).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from marval_jax.losses.mar_loss import mar_loss
from marval_jax.models.mar import MAR, MARConfig, train_encoder_len
from marval_jax.sampling import cached_sampler as cs
from marval_jax.sampling.ar_sampler import SamplerSpec, make_sampler, onestep_predictor, teacher_predictor
from marval_jax.tools.parity import rel_err
from tolerances import assert_close_to_scale, mar_depth, reassociation_atol

CFG = MARConfig(img_size=16, vae_stride=4, vae_embed_dim=4, encoder_embed_dim=16, encoder_depth=2,
                encoder_num_heads=2, decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2, buffer_size=2,
                class_num=4, diffloss_d=1, diffloss_w=16, attn_dropout=0.0, proj_dropout=0.0)
LABELS = jnp.array([0, 3, -1])
PREDICTORS = {"teacher": lambda: teacher_predictor("10"), "onestep": lambda: onestep_predictor(5)}


def sampler_tol(predictor, k):
    """Cached and uncached samplers are two programs (cache reads vs full passes, other fusions): their samples
    agree to the reassociation bound (tests/tolerances.py) of the sampler's chain - k AR steps, each a MAR pass and
    the predictor's head passes (10 teacher steps, 1 one-step; the whole model's depth bounds the head's) - on the
    samples' max-abs scale (rel_err)."""
    head_passes = 10 if predictor == "teacher" else 1
    return reassociation_atol(k * (1 + head_passes) * mar_depth(CFG), 1.0)


@functools.lru_cache(maxsize=1)
def _perturbed_state():
    state = nnx.split(MAR(CFG, rngs=nnx.Rngs(0)))[1]
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    noise = np.random.default_rng(1)
    return jax.tree_util.tree_unflatten(treedef, [
        x + (0.05 if "diffloss" in jax.tree_util.keystr(p) else 0.3) * noise.standard_normal(x.shape, np.float32)
        for p, x in flat])


@functools.lru_cache(maxsize=None)
def tiny(attention: str):
    """(graphdef, perturbed state) of the tiny MAR; the same parameters for both attention modes."""
    graphdef = nnx.split(nnx.eval_shape(lambda: MAR(dataclasses.replace(CFG, attention=attention),
                                                    rngs=nnx.Rngs(0))))[0]
    return graphdef, _perturbed_state()


@pytest.fixture(scope="module")
def causal():
    return tiny("causal")


@pytest.fixture(scope="module")
def bidirectional():
    return tiny("bidirectional")


SPEC_KW = dict(seq_len=CFG.seq_len, buffer_size=CFG.buffer_size, token_dim=CFG.token_dim)


@functools.lru_cache(maxsize=None)
def uncached(attention, predictor, k, guidance):
    """The uncached sampler's samples (the reference), compiled once per setting for every test that compares."""
    graphdef, state = tiny(attention)
    spec = SamplerSpec(num_iter=k, cfg=guidance, num_buckets=2)
    out = make_sampler(graphdef, spec, PREDICTORS[predictor](), **SPEC_KW)(state, LABELS, jax.random.PRNGKey(5))
    return np.asarray(out)


def both(attention, predictor, k, guidance, policy):
    """(uncached, cached) samples of the tiny model with `attention` (the module's fixtures' parameters)."""
    graphdef, state = tiny(attention)
    spec = SamplerSpec(num_iter=k, cfg=guidance, num_buckets=2)
    ref = uncached(attention, predictor, k, guidance)
    got = cs.make_cached_sampler(graphdef, spec, PREDICTORS[predictor](), policy=policy, **SPEC_KW)(
        state, LABELS, jax.random.PRNGKey(5))
    return ref, np.asarray(got)


# Each predictor, guidance on/off and K in {4, 7} appear, not every combination (CPU compile time). Guidance is
# tested with the teacher: the one-step predictor ignores the unconditional half.
@pytest.mark.parametrize("predictor,k,guidance", [("teacher", 7, 3.0), ("teacher", 4, 1.0), ("onestep", 4, 1.0)])
def test_exact_cache_equals_uncached_causal_sampler(predictor, k, guidance):
    ref, got = both("causal", predictor, k, guidance, "exact")
    assert np.isfinite(ref).all() and np.abs(ref).max() > 1.0
    assert rel_err(got, ref) < sampler_tol(predictor, k)


@pytest.mark.parametrize("predictor,k,guidance", [("teacher", 4, 3.0), ("onestep", 7, 1.0)])
def test_refresh_every_step_equals_uncached_bidirectional_sampler(predictor, k, guidance):
    ref, got = both("bidirectional", predictor, k, guidance, ("approx", 0, 1))
    assert rel_err(got, ref) < sampler_tol(predictor, k)


def test_approximate_cache_runs_and_reuses():
    ref, got = both("bidirectional", "onestep", 7, 1.0, ("approx", 2, 3))
    assert np.isfinite(got).all()
    err = rel_err(got, ref)
    # stale keys/values change the samples beyond rounding, a little; not a quality measurement
    assert sampler_tol("onestep", 7) < err < 0.2, err


def _state(model, tokens, n_visible):
    """Orders, mask and class embeddings for a mid-sampling state with n_visible tokens generated."""
    graphdef, state = model
    m = nnx.merge(graphdef, state)
    b, s = tokens.shape[:2]
    orders = jnp.argsort(jax.random.uniform(jax.random.PRNGKey(3), (b, s)), axis=1)
    rank = jnp.argsort(orders, axis=1)
    mask = (rank < s - n_visible).astype(jnp.float32)
    return m, orders, rank, mask, m.class_embedding(jnp.arange(b) % CFG.class_num)


def test_refresh_fills_a_cache_that_reproduces_the_full_pass(bidirectional):
    """After a refresh, mask-token queries against the cache give the full pass's z, and re-ingesting visible tokens
    (bidirectional masks) rewrites the keys/values already there: the cache layout is the model's."""
    tokens = jax.random.normal(jax.random.PRNGKey(4), (2, CFG.seq_len, CFG.token_dim))
    m, orders, rank, mask, ce = _state(bidirectional, tokens, n_visible=6)
    s, bf = CFG.seq_len, CFG.buffer_size
    scratch = cs.cache_len(CFG) - 1
    krank = cs.key_ranks(s - 1 - rank, bf)
    z, cache = cs.refresh(m, cs.init_cache(CFG, 2), tokens, mask, ce, enc_len=bf + 8)
    # cache-filling pass vs full pass (other programs): the encoder + decoder chain's bound on z's scale
    assert_close_to_scale(z, m.condition(tokens, mask, ce, enc_len=bf + s), mar_depth(CFG))
    pos = orders[:, 6:10]  # masked positions (the visible ones are orders[:, 10:])
    all_keys = (krank < scratch)[:, None, None, :]
    zp = cs.predict_condition(m, cache, pos, pos + bf, all_keys)
    assert_close_to_scale(zp, jnp.take_along_axis(z, pos[:, :, None], axis=1), mar_depth(CFG))
    vis = orders[:, 10:14] + bf
    rows = jnp.take_along_axis(tokens, (vis - bf)[:, :, None], axis=1)
    again = cs.ingest(m, cache, rows, ce, vis, vis, (krank < 6)[:, None, None, :], all_keys)
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(cache)):
        assert_close_to_scale(a[:, :scratch], b[:, :scratch], mar_depth(CFG))


def test_policies_refused_where_they_do_not_apply(causal, bidirectional):
    spec = SamplerSpec(num_iter=4)
    kw = dict(seq_len=CFG.seq_len, buffer_size=CFG.buffer_size, token_dim=CFG.token_dim)
    for (graphdef, state), policy, msg in [(bidirectional, "exact", "attention='causal'"),
                                           (causal, ("approx", 1, 2), "bidirectional")]:
        fn = cs.make_cached_sampler(graphdef, spec, onestep_predictor(5), policy=policy, **kw)
        with pytest.raises(ValueError, match=msg):
            fn(state, LABELS, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="approx"):
        cs.CachePolicy.parse(("approx", 1, 0))


def test_causal_training_loss_runs_and_differs(causal, bidirectional):
    tokens = jax.random.normal(jax.random.PRNGKey(4), (4, CFG.seq_len, CFG.token_dim))
    labels = jnp.array([0, 1, 2, 3])
    losses = {}
    for name, (graphdef, state) in (("causal", causal), ("bidirectional", bidirectional)):
        def loss(state):
            return mar_loss(nnx.merge(graphdef, state), tokens, labels, jax.random.PRNGKey(6), mask_ratio_min=0.7,
                            diffusion_batch_mul=2, enc_len=train_encoder_len(CFG, 0.7))[0]
        if name == "causal":
            losses[name], grads = jax.jit(jax.value_and_grad(loss))(state)
            assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
        else:
            losses[name] = jax.jit(loss)(state)
        assert np.isfinite(float(losses[name]))
    assert abs(float(losses["causal"]) - float(losses["bidirectional"])) > 1e-4
