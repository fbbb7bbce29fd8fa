"""The parity tool on the reference fixture kept in the repository, on a corrupted copy, and on a fixture of
another configuration (widths that differ, patch 2, other buffer / classes / head / respacing)."""
import pathlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "mar_reference_tiny.npz"
from marval_jax.tools import parity


def test_reference_fixture_passes(capsys):
    assert parity.main(["--fixture", str(FIXTURE)]) == 0
    out = capsys.readouterr().out
    assert "parity: PASS" in out
    for name in ("io/enc_out", "io/dec_out_null", "io/cfg_out", "io/tl_vb", "io/pmv_logvar",
                 "sched/seq256_iter64_n_pred", "vae_io/decoded"):
        assert name in out


def _line(text, name):
    return next(l for l in text.splitlines() if l.startswith(name + " "))


def test_corrupted_tensor_fails(tmp_path, ref):
    """Each tensor is held to its own chain's bound: one element moved by 2x the bound fails, one moved by 0.3x
    the bound (plus the few 1e-7 of real rounding) passes."""
    from marval_jax.models.mar import MARConfig
    rc = json.loads(str(ref["config_json"]))
    depths = parity.tensor_depths(MARConfig.from_dict(dict(rc, attn_dropout=0.0, proj_dropout=0.0)), rc, 64)

    def moved(name, times):
        x = np.array(ref[name], np.float64)
        x.flat[3] += times * parity.tensor_tolerance(name, depths) * np.abs(x).max()
        return x.astype(ref[name].dtype)

    bad = dict(ref)
    bad["io/dec_out"] = ref["io/dec_out"] * (1 + 1e-3)
    bad["io/enc_out"] = moved("io/enc_out", 2.0)
    bad["io/net_out"] = moved("io/net_out", 0.3)
    bad["sched/iter4_n_pred"] = ref["sched/iter4_n_pred"] + np.eye(1, 4, 0, dtype=np.int64)[0]
    path = tmp_path / "bad.npz"
    np.savez(path, **bad)
    buf = io.StringIO()
    assert not parity.run_parity(str(path), out=buf)
    text = buf.getvalue()
    for name in ("io/dec_out", "io/enc_out", "sched/iter4_n_pred"):
        assert "FAIL" in _line(text, name), text
    assert "ok" in _line(text, "io/net_out") and "ok" in _line(text, "io/dec_out_null"), text


def test_tolerances_from_the_architecture():
    """The bounds follow the depth of each chain (numerics.reassociation_atol): the VAE decoder's GroupNorm sums
    need 3.0e-4, the MAR's decoder outputs 5.6e-5, its head 3.6e-5; --tol replaces them all."""
    from marval_jax.models.mar import MARConfig
    with np.load(FIXTURE) as data:
        rc = json.loads(str(data["config_json"]))
    depths = parity.tensor_depths(MARConfig.from_dict(dict(rc, attn_dropout=0.0, proj_dropout=0.0)), rc, 64)
    tol = {k: parity.tensor_tolerance(k, depths) for k in ("io/enc_out_null", "io/dec_out", "io/net_out",
                                                            "io/tl_vb", "vae_io/post_mean", "vae_io/decoded")}
    assert tol["io/net_out"] < tol["io/tl_vb"] < tol["io/enc_out_null"] < tol["io/dec_out"] < tol["vae_io/post_mean"]
    assert tol["vae_io/post_mean"] < tol["vae_io/decoded"]
    np.testing.assert_allclose([tol["io/dec_out"], tol["vae_io/decoded"]], [5.6e-5, 3.0e-4], rtol=0.02)
    assert parity.tensor_tolerance("io/dec_out", depths, 1e-4) == 1e-4
    assert parity.tensor_tolerance("io/unknown", depths) == max(tol.values())  # the deepest chain's bound


def test_missing_file_exit_code(tmp_path):
    assert parity.main(["--fixture", str(tmp_path / "nope.npz")]) == 2


def _synthetic_fixture(path):
    """A self-consistent fixture of another config written in the reference's format (torch key layout)."""
    from marval_jax.diffusion.gaussian import GaussianDiffusion
    from marval_jax.models.mar import MAR, MARConfig, patchify
    from marval_jax.sampling.schedule import ar_schedule
    rc = dict(img_size=64, vae_stride=8, patch_size=2, vae_embed_dim=4, encoder_embed_dim=48, encoder_depth=1,
              encoder_num_heads=3, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2, mlp_ratio=4.0,
              buffer_size=3, diffloss_d=3, diffloss_w=40, num_sampling_steps="ddim5", diffusion_batch_mul=1,
              class_num=7, cfg=2.0, n_mask=9)
    cfg = MARConfig.from_dict(dict(rc, attn_dropout=0.0, proj_dropout=0.0))
    model = MAR(cfg, rngs=nnx.Rngs(3))
    # randomise the zero-initialised layers so nothing is trivially zero (NumPy noise: no per-shape XLA compiles)
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree_util.tree_flatten(state)
    noise = np.random.default_rng(0)
    state = jax.tree_util.tree_unflatten(tree, [jnp.asarray(np.asarray(l) + 0.05 * noise.standard_normal(l.shape),
                                                            jnp.float32) for l in leaves])
    nnx.update(model, state)
    fx = {"config_json": np.array(json.dumps(rc))}
    from marval_jax.tree_paths import flatten_state
    flat = flatten_state(nnx.state(model, nnx.Param))
    for path_, v in flat.items():  # back to the reference's key names and layouts
        key = path_.replace("diffloss_net/", "diffloss.net.").replace("time_embed_", "time_embed.mlp.")
        key = key.replace("adaLN_modulation_", "adaLN_modulation.").replace("mlp_0", "mlp.0").replace("mlp_2", "mlp.2")
        key = key.replace("/", ".")
        v = np.asarray(v)
        if key.endswith(".kernel"):
            key, v = key[:-7] + ".weight", v.T
        elif key.endswith(".scale") or key.endswith(".embedding"):
            key = key.rsplit(".", 1)[0] + ".weight"
        fx["param/" + key] = v
    b, s = 2, cfg.seq_len
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (b, 4, 8, 8)), np.float32)
    orders = np.stack([np.random.RandomState(i).permutation(s) for i in range(b)])
    mask = np.zeros((b, s), np.float32)
    for i in range(b):
        mask[i, orders[i, :rc["n_mask"]]] = 1
    labels = np.array([1, 5])
    fx.update({"io/x": x, "io/labels": labels, "io/orders": orders, "io/mask": mask})
    tokens = patchify(jnp.asarray(x), 2)
    n_kept = cfg.buffer_size + s - rc["n_mask"]
    for sfx, ce in (("", model.class_embedding(jnp.asarray(labels))), ("_null", model.class_embedding(None, b))):
        enc, keep, _ = model.encode(tokens, jnp.asarray(mask), ce, enc_len=cfg.buffer_size + s)
        fx[f"io/enc_out{sfx}"] = np.asarray(enc[:, :n_kept])
        fx[f"io/dec_out{sfx}"] = np.asarray(model.decode(enc, keep))
    fx["io/tokens"] = np.asarray(tokens)
    fx["io/unpatchified"] = x
    n = 4
    net_x = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (n, cfg.token_dim)), np.float32)
    net_t = np.array([0, 3, 500, 999])
    net_c = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (n, cfg.decoder_embed_dim)), np.float32)
    fx.update({"io/net_x": net_x, "io/net_t": net_t, "io/net_c": net_c,
               "io/net_out": np.asarray(model.head(jnp.asarray(net_x), jnp.asarray(net_t), jnp.asarray(net_c))),
               "io/cfg_out": np.asarray(model.diffloss_net.forward_with_cfg(
                   jnp.asarray(net_x), jnp.asarray(net_t), jnp.asarray(net_c), 2.0))})
    train = GaussianDiffusion.create("")
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (n, cfg.token_dim)), np.float32)
    xt = train.q_sample(jnp.asarray(net_x), jnp.asarray(net_t), jnp.asarray(noise))
    losses = train.training_losses(model.head(xt, jnp.asarray(net_t), jnp.asarray(net_c)), jnp.asarray(net_x),
                                   xt, jnp.asarray(net_t), jnp.asarray(noise))
    fx.update({"io/tl_x0": net_x, "io/tl_t": net_t, "io/tl_noise": noise,
               **{f"io/tl_{k}": np.asarray(v) for k, v in losses.items()}})
    gen = GaussianDiffusion.create("ddim5")
    idx = np.array([0, 1, 2, 4])
    pmv = gen.p_mean_variance(model.head(jnp.asarray(net_x), gen.model_timesteps(jnp.asarray(idx)),
                                         jnp.asarray(net_c)), jnp.asarray(net_x), jnp.asarray(idx))
    fx.update({"io/pmv_t_index": idx, "io/pmv_mean": np.asarray(pmv["mean"]),
               "io/pmv_logvar": np.asarray(pmv["log_variance"]), "io/pmv_xstart": np.asarray(pmv["pred_xstart"])})
    fx.update({"sched/train_betas": train.betas, "sched/train_alphas_cumprod": train.alphas_cumprod,
               "sched/gen_timestep_map": gen.timestep_map, "sched/gen_betas": gen.betas,
               "sched/gen_post_logvar_clipped": gen.posterior_log_variance_clipped})
    sch = ar_schedule(s, 5)
    fx.update({"sched/iter5_mask_len": sch.mask_len, "sched/iter5_n_pred": sch.n_pred,
               "sched/iter5_cfg_iter": sch.cfg(2.0)})
    np.savez(path, **fx)


def test_other_config_fixture_passes(tmp_path):
    path = tmp_path / "other.npz"
    with jax.default_matmul_precision("float32"):  # parity's setting: its eager ops reuse the fixture's compiles
        _synthetic_fixture(path)
    buf = io.StringIO()
    ok = parity.run_parity(str(path), out=buf)
    assert ok, buf.getvalue()
    assert "sched/iter5_n_pred" in buf.getvalue() and "io/pmv_mean" in buf.getvalue()


CFG_FIXTURE = FIXTURE.parent / "mar_reference_cfg29.npz"


def test_cfg_fixture_schedules_exact():
    """A fixture of another config (64 tokens) at cfg 2.9, recorded with the reference loop's torch float32
    arithmetic (tests/fixtures/record_cfg_schedule.py): every schedule matches exactly. Our float64
    ARSchedule.cfg, even rounded to float32, is one float32 rounding off at 13 and 64 steps, which is why the tool
    computes the reference's float32 chain (reference_cfg_schedule)."""
    from marval_jax.sampling.schedule import ar_schedule
    buf = io.StringIO()
    assert parity.run_parity(str(CFG_FIXTURE), out=buf), buf.getvalue()
    text = buf.getvalue()
    for k in (5, 13, 64):
        assert "ok" in _line(text, f"sched/iter{k}_cfg_iter") and "(exact)" in _line(text, f"sched/iter{k}_cfg_iter")
    assert "sched/seq256_iter256_cfg_iter" in text and "schedules only" in text
    with np.load(CFG_FIXTURE) as data:
        ref = data["sched/iter13_cfg_iter"]
    assert not np.array_equal(ar_schedule(64, 13).cfg(2.9).astype(np.float32).astype(np.float64), ref)


def test_recorder_reproduces_the_committed_cfg_fixture(tmp_path):
    """The recorder is the fixture's provenance: run again, it writes the committed arrays bit for bit."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("record_cfg_schedule", FIXTURE.parent / "record_cfg_schedule.py")
    rec = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rec)
    rec.record(str(tmp_path / "again.npz"))
    with np.load(CFG_FIXTURE) as a, np.load(tmp_path / "again.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            assert np.array_equal(a[k], b[k]), k
