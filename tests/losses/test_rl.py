"""MARVAL-RL loss (marval_jax/losses/rl.py) on a tiny MAR: training signal, truncation, remat, freezing, regularisers.

The tiny generator's parameters are random (MAR's init zeroes the head's output layers, which would cut every
gradient to the transformer), drawn with NumPy so that setting up compiles nothing. The reward is
-mean((image - 0.5)^2), differentiable. Every jit here compiles at XLA backend optimisation level 0: the programs
are tiny, and compiling, not running, is what costs time on CPU.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest
from flax import nnx

from configs import marval_rl
from marval_jax.data.tokenizers import PixelPatchTokenizer
from marval_jax.losses.rl import (RLSettings, format_prompts, make_rl_loss, make_rl_sampler, trainable_mask)
from marval_jax.models.mar import MAR, MARConfig
from marval_jax.sampling.ar_sampler import SamplerSpec
from marval_jax.sampling.schedule import ar_schedule
from tolerances import assert_close_to_scale, assert_trees_close, mar_depth, max_abs, reassociation_atol

CFG = MARConfig(img_size=8, vae_stride=2, patch_size=1, vae_embed_dim=4, encoder_embed_dim=16, encoder_depth=1,
                encoder_num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0,
                buffer_size=2, class_num=3, diffloss_d=1, diffloss_w=16, attn_dropout=0.0, proj_dropout=0.0,
                label_drop_prob=0.0)   # seq_len 16, token_dim 4 = 2x2 pixel patches of an 8x8 image
TOK = PixelPatchTokenizer(patch_size=2, channels=1, height=8, width=8)
LABELS = jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)
RNG = jax.random.key(7)
GEN = dict(t_init=760, trainable="all")
# Roundings on the RL loss's longest chain (tests/tolerances.py): num_iter=4 AR iterations, each a MAR pass with the
# one-step head, then the reward's mean over 8x8 pixels and the batch's 6; the gradient runs it back (x3) and sums
# the weight gradients over 6 samples x 18 positions x 4 iterations. Two programs (remat or not, truncated or not,
# another trainable set) agree to the reassociation bound of these, on each leaf's scale.
RL_FWD_DEPTH = 4 * mar_depth(CFG) + 64 + 6
RL_GRAD_DEPTH = 3 * RL_FWD_DEPTH + 6 * 18 * 4


def reward(images, labels):
    del labels
    return -jnp.mean(jnp.square(images - 0.5), axis=(1, 2, 3))


def rl_cfg(**kw) -> mlc.ConfigDict:
    base = dict(num_iter=4, backprop_steps=-1, remat=False, reward_scale=1.0,
                prompt_template="a photo of {class}", regularizer="none", reg_weight=0.0)
    return mlc.ConfigDict({**base, **kw})


def jit(fn, **kw):
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kw)


def perturb(params, seed: int, std: float):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(p + std * rng.standard_normal(p.shape), jnp.float32), params)


@pytest.fixture(scope="module")
def tiny():
    """(graphdef, params): layer-norm scales 1 + N(0, 0.05^2), kernels N(0, 1 / fan_in), the rest N(0, 0.05^2)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MAR(CFG, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def init(path, x):
        name, n = jax.tree_util.keystr(path), rng.standard_normal(x.shape)
        if "['scale']" in name:
            return jnp.asarray(1.0 + 0.05 * n, jnp.float32)
        if "['kernel']" in name:
            return jnp.asarray(n / np.sqrt(x.shape[0]), jnp.float32)
        return jnp.asarray(0.05 * n, jnp.float32)

    return graphdef, jax.tree_util.tree_map_with_path(init, abstract)


@functools.lru_cache(maxsize=None)
def grad_fn(rl_items: tuple, gen_items: tuple = tuple(GEN.items())):
    loss = make_rl_loss(rl_cfg(**dict(rl_items)), dict(gen_items), CFG, TOK.decode, reward)
    return jit(jax.value_and_grad(loss, argnums=1, has_aux=True), static_argnums=0)


def default_grads(tiny):
    return grad_fn(())(tiny[0], tiny[1], None, LABELS, RNG)


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_reward_rises_under_optax(tiny):
    graphdef, params = tiny
    step_grad = grad_fn(())
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)
    eval_rng = jax.random.key(123)
    before = float(step_grad(graphdef, params, None, LABELS, eval_rng)[0][1]["reward_mean"])
    for i in range(20):
        (_, m), g = step_grad(graphdef, params, None, LABELS, jax.random.fold_in(RNG, i))
        updates, opt_state = opt.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
    after = float(step_grad(graphdef, params, None, LABELS, eval_rng)[0][1]["reward_mean"])
    assert np.isfinite(after)
    print(f"reward {before:.4f} -> {after:.4f}")
    assert after > before + 0.5 * abs(before), (before, after)


def test_loss_is_scaled_reward_plus_weighted_gsim_regulariser(tiny):
    graphdef, params = tiny
    (loss0, m0), _ = default_grads(tiny)
    np.testing.assert_allclose(loss0, -m0["reward_mean"], rtol=1e-6)
    assert float(m0["reg"]) == 0.0 and float(m0["reward_std"]) > 0.0

    def reg_fn(gd, p, labels, rng):  # any scalar of the generator; here the squared class embeddings
        assert gd is graphdef and labels.shape == LABELS.shape and rng.shape == RNG.shape
        return jnp.sum(jnp.square(nnx.merge(gd, p).class_emb.embedding[...]))

    loss_fn = make_rl_loss(rl_cfg(reward_scale=2.0, regularizer="gsim", reg_weight=0.5), GEN, CFG, TOK.decode,
                           reward, reg_fn=reg_fn)
    loss, m = jit(loss_fn, static_argnums=0)(graphdef, params, None, LABELS, RNG)
    # the same samples, from another program (this loss has a regulariser)
    assert_close_to_scale(m["reward_mean"], m0["reward_mean"], RL_FWD_DEPTH)
    emb = params["class_emb"]["embedding"][...]
    assert_close_to_scale(m["reg"], jnp.sum(emb ** 2), emb.size + 1)  # a sum of squares in any order
    # a*r + b*g, with or without FMA, on the terms' scale (the two may cancel)
    assert_close_to_scale(loss, -2.0 * m["reward_mean"] + 0.5 * m["reg"], 3,
                          scale=2.0 * abs(float(m["reward_mean"])) + 0.5 * abs(float(m["reg"])))
    with pytest.raises(ValueError, match="reg_fn"):
        make_rl_loss(rl_cfg(regularizer="gsim"), GEN, CFG, TOK.decode, reward)


def test_remat_gives_the_same_gradients(tiny):
    (loss0, _), g0 = default_grads(tiny)
    (loss1, _), g1 = grad_fn((("remat", True),))(tiny[0], tiny[1], None, LABELS, RNG)
    assert_close_to_scale(loss1, loss0, RL_FWD_DEPTH)
    a, b = flat(g0), flat(g1)
    assert a.keys() == b.keys()
    for k in a:
        assert_close_to_scale(b[k], a[k], RL_GRAD_DEPTH, err_msg=k)
    assert max(np.abs(v).max() for v in a.values()) > 0


def test_head_only_freezes_the_transformer(tiny):
    mask = flat(trainable_mask(tiny[1], "head_only"))
    assert any(mask.values()) and not all(mask.values())
    assert all(bool(m) == ("'diffloss_net'" in k) for k, m in mask.items())
    (_, _), g_all = default_grads(tiny)
    (_, _), g_head = grad_fn((), (("t_init", 760), ("trainable", "head_only")))(tiny[0], tiny[1], None, LABELS, RNG)
    a, h = flat(g_all), flat(g_head)
    for k, v in h.items():
        if mask[k]:
            # the head's own gradient is unchanged: freezing stops parameters, not activations (the head's
            # outputs still reach the reward through later AR iterations of the frozen transformer)
            # (two programs: the reassociation bound of the gradient chain on the leaf's scale)
            assert_close_to_scale(v, a[k], RL_GRAD_DEPTH, err_msg=k)
        else:
            assert np.all(v == 0.0), k
            assert np.abs(a[k]).max() > 0 or "fake_latent" in k, k  # nonzero when trained (null class unused)
    assert max(np.abs(v).max() for k, v in h.items() if mask[k]) > 0


def test_backprop_steps_cuts_the_early_iterations(tiny):
    """K = 2: the first iteration writes orders[:, n_last:], the last one orders[:, :n_last]. With backprop_steps=1
    the early tokens carry no gradient at all, and the late tokens lose the path through the early ones."""
    graphdef, params = tiny
    n_last = int(ar_schedule(CFG.seq_len, 2).masked_before[-1])
    weights = jax.random.normal(jax.random.key(3), (LABELS.shape[0], CFG.seq_len, CFG.token_dim))

    def grads(bp):
        sample = make_rl_sampler(rl_cfg(num_iter=2, backprop_steps=bp), GEN, CFG)

        def parts(p):  # (weighted sum of the early tokens, of the late tokens), tokens
            tokens, orders = sample(graphdef, p, LABELS, RNG)
            late = (jnp.argsort(orders, axis=1) < n_last)[..., None]
            wt = tokens * weights
            return jnp.stack([jnp.sum(jnp.where(late, 0.0, wt)), jnp.sum(jnp.where(late, wt, 0.0))]), tokens

        jac, tokens = jit(jax.jacrev(parts, has_aux=True))(params)
        return (tokens, jax.tree.map(lambda j: j[0], jac), jax.tree.map(lambda j: j[1], jac))

    tok_cut, early_cut, late_cut = grads(1)
    tok_all, early_all, late_all = grads(-1)
    # truncation changes gradients only: the tokens of the two programs agree to the forward chain's bound
    assert_close_to_scale(tok_cut, tok_all, RL_FWD_DEPTH)
    assert np.all(np.asarray(tok_all) != 0.0)                 # every position was written
    assert all(np.all(v == 0.0) for v in flat(early_cut).values())
    assert max(np.abs(v).max() for v in flat(early_all).values()) > 0      # the control: the test can fail
    lc, la = flat(late_cut), flat(late_all)
    assert max(np.abs(v).max() for v in lc.values()) > 0
    assert max(np.abs(lc[k] - la[k]).max() for k in lc) > 1e-3 * max(np.abs(v).max() for v in la.values())


def test_num_iter_and_validation(tiny):
    graphdef, params = tiny
    out = {}
    for k in (1, 3):
        sample = make_rl_sampler(rl_cfg(num_iter=k), GEN, CFG)
        out[k] = np.asarray(jit(lambda p, s=sample: s(graphdef, p, LABELS, RNG)[0])(params))
        assert np.all(out[k] != 0.0), k   # all K iterations together write every position
    assert np.abs(out[1] - out[3]).max() > 1e-3
    with pytest.raises(ValueError, match="num_iter"):
        make_rl_sampler(rl_cfg(num_iter=CFG.seq_len + 1), GEN, CFG)
    for bp in (0, -2, 5):
        with pytest.raises(ValueError, match="backprop_steps"):
            make_rl_sampler(rl_cfg(num_iter=4, backprop_steps=bp), GEN, CFG)
    with pytest.raises(ValueError, match="trainable"):
        make_rl_loss(rl_cfg(), dict(GEN, trainable="transformer"), CFG, TOK.decode, reward)
    with pytest.raises(ValueError, match="regularizer"):
        make_rl_loss(rl_cfg(regularizer="kl"), GEN, CFG, TOK.decode, reward)


def test_noise_scale_reaches_the_trajectories(tiny):
    """generator.noise_scale (a student distilled on x ~ N(0, s^2 I)): the RL loop draws its one-step input with
    that std, as the sampler the student is evaluated with. Against the decode driver with a predictor written here
    from the formula (one head call at t_init on s * N(0, I)); 1 and 0.5 give other tokens."""
    from marval_jax.models.generator import one_step
    from marval_jax.sampling.decode import decode, make_plan
    graphdef, params = tiny
    spec_kw = dict(seq_len=CFG.seq_len, buffer_size=CFG.buffer_size, token_dim=CFG.token_dim)
    plan = make_plan(SamplerSpec(num_iter=4, num_buckets=1), differentiable=True, backprop_steps=-1, remat=False,
                     **spec_kw)

    def by_hand(model, zc, zu, cfg_scale, rng):
        del zu, cfg_scale
        return one_step(model.head, 0.5 * jax.random.normal(rng, (zc.shape[0], CFG.token_dim)), zc, GEN["t_init"])

    spec = SamplerSpec(num_iter=4, num_buckets=1)   # the plan's, so both sides run the same program shapes
    tokens = {s: np.asarray(jit(lambda p, smp=make_rl_sampler(rl_cfg(), dict(GEN, noise_scale=s), CFG, spec):
                                smp(graphdef, p, LABELS, RNG)[0])(params)) for s in (1.0, 0.5)}
    want = np.asarray(jit(lambda p: decode(lambda q: nnx.merge(graphdef, q), p, LABELS, RNG, plan, by_hand).tokens)(
        params))
    assert_close_to_scale(tokens[0.5], want, RL_FWD_DEPTH)
    assert np.abs(tokens[0.5] - tokens[1.0]).max() > 1e-2
    with pytest.raises(ValueError, match="generator.noise_scale must be a finite float > 0"):
        make_rl_sampler(rl_cfg(), dict(GEN, noise_scale=0.0), CFG)


def test_l2_regulariser_to_the_reference(tiny):
    graphdef, params = tiny
    fn = grad_fn((("regularizer", "l2"), ("reg_weight", 1.0), ("reward_scale", 0.0)))
    (loss0, m0), g0 = fn(graphdef, params, params, LABELS, RNG)
    ref = perturb(params, 5, 0.02)
    (loss1, m1), g1 = fn(graphdef, params, ref, LABELS, RNG)
    # zero up to round-off when gen == ref: the two samplers in the loss are compiled apart, their tokens differ by
    # at most the forward chain's bound delta, so the mean square is at most delta^2
    r_sample = jax.random.split(RNG)[0]  # the loss's sampling key
    tokens = jit(lambda p: make_rl_sampler(rl_cfg(), GEN, CFG)(graphdef, p, LABELS, r_sample)[0])(params)
    delta = reassociation_atol(RL_FWD_DEPTH, max_abs(tokens))
    assert abs(float(m0["reg"])) <= delta ** 2 and abs(float(loss0)) <= delta ** 2
    assert float(m1["reg"]) > 1e-4
    np.testing.assert_allclose(loss1, m1["reg"], rtol=0)  # reward_scale 0, reg_weight 1: loss = 0 + 1 * reg exactly
    g0_max = max(np.abs(v).max() for v in flat(g0).values())
    g1_max = max(np.abs(v).max() for v in flat(g1).values())
    assert g1_max > 1e-4 and g0_max < 1e-2 * g1_max, (g0_max, g1_max)  # pulled towards the reference only if apart
    with pytest.raises(ValueError, match="ref_params"):
        fn(graphdef, params, None, LABELS, RNG)


def test_prompt_template():
    names = ["T-shirt/top", "Trouser"]
    assert format_prompts("a high-quality and harmonious picture of {class}", names) == [
        "a high-quality and harmonious picture of T-shirt/top", "a high-quality and harmonious picture of Trouser"]
    with pytest.raises(ValueError, match="class"):
        format_prompts("a picture", names)
    loss = make_rl_loss(rl_cfg(prompt_template="{class}, photo"), GEN, CFG, TOK.decode, reward)
    assert loss.settings.prompt_template == "{class}, photo"


@pytest.mark.parametrize("variant", marval_rl.VARIANTS)
def test_configs(variant):
    cfg = marval_rl.get_config(variant)
    imagenet = variant not in ("tiny", "fmnist", "fmnist_l")
    assert cfg.rl.num_iter == (4 if variant == "tiny" else 64)
    assert cfg.rl.reward == ("pickscore" if imagenet else "classifier_logprob")
    assert (cfg.rl.backprop_steps, cfg.rl.remat, cfg.rl.reward_scale, cfg.rl.regularizer, cfg.rl.reg_weight) == (
        -1, True, 1.0, "none", 0.0)
    assert cfg.rl.prompt_template == "a high-quality and harmonious picture of {class}"
    assert cfg.generator.lr == (1e-6 if imagenet else 1e-5) and cfg.generator.trainable == "all"
    # fmnist_l: EMA 0.95, so a budgeted run of ~100 steps exports its trained weights (configs/marval_rl.py)
    assert (cfg.generator.b1, cfg.generator.b2, cfg.generator.grad_clip, cfg.generator.ema_decay) == (
        0.0, 0.999, 1.0, 0.95 if variant == "fmnist_l" else 0.999)
    assert cfg.train.lr == cfg.generator.lr and cfg.train.b1 == 0.0
    # fmnist: stop at the reward plateau, 4 windows of patience (2 stopped on window noise, configs/marval_rl.py)
    assert cfg.train.stop_on_plateau == ("" if imagenet or variant == "tiny" else "reward_mean")
    assert cfg.train.plateau_patience == 4
    with pytest.raises(AttributeError):
        cfg.rl.not_a_field = 1
    st = RLSettings.from_config(cfg.rl, cfg.generator)
    st.validate(MARConfig.from_dict(cfg.model.to_dict()).seq_len)
    if variant == "tiny":
        make_rl_loss(cfg.rl, cfg.generator, MARConfig.from_dict(cfg.model.to_dict()), TOK.decode, reward)


@pytest.mark.parametrize("rl_remat", [False, True])
def test_block_remat_traces_and_keeps_the_gradients(tiny, rl_remat):
    """model.remat (per-block, the large / huge configs) under both rl.remat settings. rl.remat=False closes the AR
    loop's `lax.scan` body over the parameters; the blocks' remat was `nnx.remat` of a block merged from them, which
    flax refused to trace (TraceContextError, docs/scale.md). Remat changes memory, not values: the gradients are the
    plain model's."""
    graphdef, params = tiny
    remat_cfg = dataclasses.replace(CFG, remat=True)
    remat_graphdef = nnx.split(nnx.eval_shape(lambda: MAR(remat_cfg, rngs=nnx.Rngs(0))))[0]

    def grads(model_cfg, gd):
        loss = make_rl_loss(rl_cfg(remat=rl_remat, num_iter=2), GEN, model_cfg, TOK.decode, reward)
        return jit(jax.value_and_grad(loss, argnums=1, has_aux=True), static_argnums=0)(gd, params, None, LABELS, RNG)

    (loss0, _), g0 = grads(CFG, graphdef)
    (loss1, _), g1 = grads(remat_cfg, remat_graphdef)
    assert_close_to_scale(loss1, loss0, RL_FWD_DEPTH)
    a, b = flat(g0), flat(g1)
    assert a.keys() == b.keys()
    for k in a:
        assert_close_to_scale(b[k], a[k], RL_GRAD_DEPTH, err_msg=k)
    assert max(np.abs(v).max() for v in a.values()) > 0
