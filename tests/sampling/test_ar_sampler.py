"""The AR schedule equals the reference's for the recorded (S, K); the compiled sampler predicts exactly the
reference's tokens at every step; the samplers run end to end."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from marval_jax.sampling import ar_sampler
from marval_jax.sampling.schedule import ar_schedule, plan_segments


@pytest.mark.parametrize("prefix,s,k", [("iter4", 16, 4), ("iter7", 16, 7), ("seq256_iter64", 256, 64),
                                        ("seq256_iter256", 256, 256)])
def test_schedule_matches_reference(ref, prefix, s, k):
    sched = ar_schedule(s, k)
    np.testing.assert_array_equal(sched.mask_len, ref[f"sched/{prefix}_mask_len"])
    np.testing.assert_array_equal(sched.n_pred, ref[f"sched/{prefix}_n_pred"])
    np.testing.assert_array_equal(sched.cfg(3.0, "linear"), ref[f"sched/{prefix}_cfg_iter"])
    assert sched.n_pred.sum() == s


@pytest.mark.parametrize("s,k", [(16, 1), (16, 16), (64, 10), (256, 64), (1024, 128)])
def test_segments_cover_every_step(s, k):
    sched = ar_schedule(s, k)
    segs = plan_segments(sched, 4, 4)
    assert segs[0].start == 0 and segs[-1].stop == k and len(segs) <= 4
    for a, b in zip(segs, segs[1:]):
        assert a.stop == b.start
    for seg in segs:
        visible = s - sched.masked_before[seg.start:seg.stop]
        assert (visible + 4 <= seg.enc_len).all() and (sched.n_pred[seg.start:seg.stop] <= seg.pred_cap).all()


def test_bad_num_iter():
    with pytest.raises(ValueError, match="num_iter"):
        ar_schedule(16, 17)


def _reference_loop(orders, sched, values):
    """The reference's sample_tokens bookkeeping: which position gets written at which step."""
    b, s = orders.shape
    out = np.zeros((b, s))
    mask = np.ones((b, s))
    for step in range(sched.num_iter):
        nxt = np.zeros_like(mask)
        for i in range(b):
            nxt[i, orders[i, :int(sched.mask_len[step])]] = 1
        pred = mask.astype(bool) if step >= sched.num_iter - 1 else np.logical_xor(mask.astype(bool), nxt.astype(bool))
        out[pred] = values[step]
        mask = nxt
    return out


@pytest.mark.parametrize("k,buckets", [(4, 4), (7, 1), (16, 3)])
def test_sampler_predicts_reference_positions(ref_model, k, buckets):
    model, cfg = ref_model
    graphdef, state = nnx.split(model)

    def marker(model, zc, zu, cfg_scale, rng):  # writes the step's (distinct) guidance scale
        assert zu is not None
        return jnp.full((zc.shape[0], model.cfg.token_dim), cfg_scale)
    spec = ar_sampler.SamplerSpec(num_iter=k, cfg=3.0, num_buckets=buckets)
    fn = ar_sampler.make_sampler(graphdef, spec, marker, seq_len=cfg.seq_len, buffer_size=cfg.buffer_size,
                                 token_dim=cfg.token_dim)
    rng = jax.random.PRNGKey(3)
    got = np.asarray(fn(state, jnp.array([1, 2, -1]), rng))[:, :, 0]
    orders = np.asarray(ar_sampler.random_orders(jax.random.split(rng)[0], 3, cfg.seq_len))
    sched = ar_schedule(cfg.seq_len, k)
    np.testing.assert_array_equal(got, _reference_loop(orders, sched, sched.cfg(3.0).astype(np.float32)))


def test_teacher_and_onestep_samplers_run(ref_model):
    model, cfg = ref_model
    graphdef, state = nnx.split(model)
    for pred, c in ((ar_sampler.teacher_predictor("10", temperature=1.0), 3.0), (ar_sampler.onestep_predictor(760), 1.0)):
        fn = ar_sampler.make_sampler(graphdef, ar_sampler.SamplerSpec(num_iter=4, cfg=c), pred, seq_len=cfg.seq_len,
                                     buffer_size=cfg.buffer_size, token_dim=cfg.token_dim)
        a = fn(state, jnp.array([0, 1]), jax.random.PRNGKey(0))
        b = fn(state, jnp.array([0, 1]), jax.random.PRNGKey(0))
        assert a.shape == (2, cfg.seq_len, cfg.token_dim) and np.isfinite(np.asarray(a)).all()
        np.testing.assert_array_equal(a, b)


def test_bucket_count_changes_only_the_noise_draws():
    """sample.num_buckets pads each loop body's encoder to its bucket's length and masks the padding, so with the
    head's noise held fixed the samples agree to float32 rounding (different padded shapes, same sums); with noise
    they differ, because the noise is drawn at the padded row count (docs/benchmarks.md, "The RL step's compile")."""
    import dataclasses
    from marval_jax.benchmarks.model_bench import model_config, random_state
    cfg = dataclasses.replace(model_config("tiny"), dtype="float32", encoder_depth=2, decoder_depth=2)
    graphdef, state = random_state(cfg)   # random head too: MAR's zero-initialised output layer would give zeros

    def fixed_noise(model, zc, zu, cfg_scale, rng):
        return ar_sampler.one_step(model.head, jnp.zeros((zc.shape[0], model.cfg.token_dim)), zc, 760)

    def run(predictor, buckets):
        fn = ar_sampler.make_sampler(graphdef, ar_sampler.SamplerSpec(num_iter=8, num_buckets=buckets), predictor,
                                     seq_len=cfg.seq_len, buffer_size=cfg.buffer_size, token_dim=cfg.token_dim)
        return np.asarray(fn(state, jnp.array([0, 1, 2]), jax.random.PRNGKey(0)))

    one, three = run(fixed_noise, 1), run(fixed_noise, 3)
    scale = np.abs(one).max()
    assert scale > 0.1
    np.testing.assert_allclose(three, one, rtol=0, atol=1e-5 * scale)
    noisy_one, noisy_three = run(ar_sampler.onestep_predictor(760), 1), run(ar_sampler.onestep_predictor(760), 3)
    assert np.abs(noisy_three - noisy_one).max() > 0.1 * np.abs(noisy_one).max()
