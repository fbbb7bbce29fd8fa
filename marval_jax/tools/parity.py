"""Recompute every tensor of a reference fixture with our code and report the max relative error of each.

    python -m marval_jax.tools.parity --fixture ../shared/fixtures/mar_reference_tiny.npz

The model is built from the fixture's `config_json` and its `param/` weights go through the same converter users
run on released checkpoints. Each tensor's max relative error (max|a-b| / max|b|) must stay within the float32
rounding bound of the chain that computes it (`tensor_tolerance`: marval_jax.numerics.reassociation_atol over the
depth of the encoder, the encoder + decoder, the diffusion head, or the VAE encoder / decoder of the fixture's
architecture); `--tol` replaces every such bound by one number. Schedules (`sched/`) and the patchify permutations
(`io/tokens`, `io/unpatchified`) must match exactly; the guidance schedule is computed in the reference's own
float32 arithmetic for that (`reference_cfg_schedule`). A fixture without `param/` weights is checked on its
schedules alone. Exit status 1 if anything fails, 2 if the fixture cannot be
read.
"""
from __future__ import annotations

import argparse
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from marval_jax.checkpoints.convert_mar import load_into_model
from marval_jax.checkpoints.safe_load import open_npz
from marval_jax.diffusion.gaussian import GaussianDiffusion
from marval_jax.models.mar import MAR, MARConfig, patchify, unpatchify
from marval_jax.numerics import mar_depth_parts, reassociation_atol, vae_depth
from marval_jax.sampling.schedule import ar_schedule
from marval_jax.user_errors import add_verbose_flag, one_line, run_cli

EXACT = "exact"
# Roundings after the diffusion head (all elementwise but the mean over the token): the guidance mix
# uncond + w * (cond - uncond); q_sample (2 products, 1 sum) and the losses (squared error, the normal KL with its
# exps and the discretised likelihood's tanh/log, at most 32 roundings, then the mean over token_dim); the
# posterior mean / variance (x_start = a*x - b*eps, mean = c1*x_start + c2*x, the learned-range log-variance
# interpolation, at most 16).
_CFG_EXTRA, _LOSS_EXTRA, _PMV_EXTRA = 3, 32, 16


def tensor_depths(cfg: MARConfig, ref_cfg: dict, vae_img: int | None = None) -> dict[str, int]:
    """Depth (roundings on the longest chain, marval_jax.numerics) of each group of fixture tensors, from the
    architecture: the encoder outputs run the encoder, the decoder outputs the encoder and the decoder, the head
    outputs the diffusion head (its inputs are given) plus the few operations after it, the VAE outputs its encoder
    or decoder on vae_img-pixel images."""
    parts = mar_depth_parts(cfg)
    head = parts["head"]
    depths = {"io/enc_out": parts["encoder"], "io/dec_out": parts["decoder"], "io/net_out": head,
              "io/cfg_out": head + _CFG_EXTRA, "io/tl_": head + _LOSS_EXTRA + cfg.token_dim,
              "io/pmv_": head + _PMV_EXTRA}
    if vae_img is not None and "vae_ch" in ref_cfg:
        ch, mult = int(ref_cfg["vae_ch"]), tuple(int(m) for m in ref_cfg["vae_ch_mult"])
        depths["vae_io/post_"] = vae_depth(ch, mult, vae_img)
        depths["vae_io/decoded"] = vae_depth(ch, mult, vae_img, decoder=True)
    return depths


def tensor_tolerance(name: str, depths: dict[str, int], override: float | None = None) -> float:
    """The max relative error allowed for fixture tensor `name`: `override` if given, else the probabilistic
    float32 bound of its group's depth on the tensor's own scale (max|ref| = 1 in relative terms). A tensor of no
    known group gets the largest depth: a bound that holds for every chain of the model."""
    if override is not None:
        return float(override)
    depth = next((d for prefix, d in depths.items() if name.startswith(prefix)), max(depths.values()))
    return reassociation_atol(depth, 1.0)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return float("inf")
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def _mar_results(fx, cfg: MARConfig, ref_cfg: dict) -> dict[str, np.ndarray]:
    model = MAR(cfg, rngs=nnx.Rngs(0))
    load_into_model(model, {k[len("param/"):]: fx[k] for k in fx if k.startswith("param/")}, "fixture param/")
    out: dict[str, np.ndarray] = {}
    p = cfg.patch_size
    x = jnp.asarray(fx["io/x"], jnp.float32)
    tokens = patchify(x, p)
    out["io/tokens"] = tokens
    out["io/unpatchified"] = unpatchify(jnp.asarray(fx["io/tokens"]), p, cfg.vae_embed_dim)
    mask = jnp.asarray(fx["io/mask"], jnp.float32)
    labels = jnp.asarray(fx["io/labels"], jnp.int32)
    full = cfg.buffer_size + cfg.seq_len
    for suffix, ce in (("", model.class_embedding(labels)), ("_null", model.class_embedding(None, x.shape[0]))):
        enc, keep, _ = model.encode(tokens, mask, ce, enc_len=full)
        n_kept = fx[f"io/enc_out{suffix}"].shape[1]
        out[f"io/enc_out{suffix}"] = enc[:, :n_kept]
        out[f"io/dec_out{suffix}"] = model.decode(enc, keep)
    net_x, net_t, net_c = (jnp.asarray(fx[f"io/net_{n}"]) for n in "xtc")
    net_t = net_t.astype(jnp.int32)
    out["io/net_out"] = model.head(net_x, net_t, net_c)
    out["io/cfg_out"] = model.diffloss_net.forward_with_cfg(net_x, net_t, net_c, float(ref_cfg.get("cfg", 1.0)))
    train = GaussianDiffusion.create("")
    x0, t, noise = jnp.asarray(fx["io/tl_x0"]), jnp.asarray(fx["io/tl_t"], jnp.int32), jnp.asarray(fx["io/tl_noise"])
    xt = train.q_sample(x0, t, noise)
    losses = train.training_losses(model.head(xt, t, net_c[: x0.shape[0]]), x0, xt, t, noise)
    for k in ("mse", "vb", "loss"):
        out[f"io/tl_{k}"] = losses[k]
    gen = GaussianDiffusion.create(str(ref_cfg["num_sampling_steps"]))
    idx = jnp.asarray(fx["io/pmv_t_index"], jnp.int32)
    pmv = gen.p_mean_variance(model.head(net_x, gen.model_timesteps(idx), net_c), net_x, idx)
    out["io/pmv_mean"], out["io/pmv_logvar"], out["io/pmv_xstart"] = pmv["mean"], pmv["log_variance"], pmv["pred_xstart"]
    return {k: np.asarray(v) for k, v in out.items()}


def reference_cfg_schedule(sched, cfg: float, schedule: str = "linear") -> np.ndarray:
    """The guidance scale per step as the reference's `sample_tokens` computes it: in float32, on the float32
    `mask_len` tensor, left to right: 1 + (cfg - 1) * (S - mask_len) / S, with the Python float cfg - 1 rounded to
    float32 as a scalar operand. Our sampler's float64 `ARSchedule.cfg` differs from it by a float32 rounding at
    cfg scales such as 2.9, so the comparison is exact only in the reference's own arithmetic."""
    if schedule == "constant":
        return np.full(sched.num_iter, np.float32(cfg))
    if schedule != "linear":
        return sched.cfg(cfg, schedule)  # raises the schedule's own error
    s = np.float32(sched.seq_len)
    mask_len = np.asarray(sched.mask_len, np.float32)
    return np.float32(1) + np.float32(cfg - 1) * (s - mask_len) / s


def _sched_results(names, ref_cfg: dict, seq_len: int) -> dict[str, np.ndarray]:
    out = {}
    train = GaussianDiffusion.create("")
    gen = GaussianDiffusion.create(str(ref_cfg["num_sampling_steps"]))
    out.update({"sched/train_betas": train.betas, "sched/train_alphas_cumprod": train.alphas_cumprod,
                "sched/gen_timestep_map": gen.timestep_map, "sched/gen_betas": gen.betas,
                "sched/gen_post_logvar_clipped": gen.posterior_log_variance_clipped})
    for name in names:
        m = re.fullmatch(r"sched/(?:seq(\d+)_)?iter(\d+)_(mask_len|n_pred|cfg_iter)", name)
        if not m:
            continue
        s = int(m.group(1)) if m.group(1) else seq_len
        sched = ar_schedule(s, int(m.group(2)))
        cfg = 3.0 if m.group(1) else float(ref_cfg.get("cfg", 1.0))
        out[name] = {"mask_len": sched.mask_len, "n_pred": sched.n_pred,
                     "cfg_iter": reference_cfg_schedule(sched, cfg, "linear")}[m.group(3)]
    return out


def run_parity(path: str, tol: float | None = None, out=None) -> bool:
    """Prints one line per fixture tensor with its error and bound; returns True if all pass. `tol` overrides
    the derived bounds (tensor_tolerance)."""
    out = out or sys.stdout
    with open_npz(path, what="parity fixture") as data:
        fx = {k: data[k] for k in data.files}
    if "config_json" not in fx:
        raise ValueError(f"{path} has no config_json: not a reference fixture")
    ref_cfg = json.loads(str(fx["config_json"]))
    cfg = MARConfig.from_dict(dict(ref_cfg, attn_dropout=0.0, proj_dropout=0.0, dtype="float32"))
    results: dict[str, tuple[float, str]] = {}
    ours: dict[str, np.ndarray] = {}
    if any(k.startswith("param/") for k in fx):
        with jax.default_matmul_precision("float32"):
            ours = _mar_results(fx, cfg, ref_cfg)
    else:  # a schedule-only fixture (tests/fixtures/record_cfg_schedule.py): nothing of the model to recompute
        print("no param/ weights in this fixture: schedules only", file=out)
    for k, v in ours.items():
        if k in ("io/tokens", "io/unpatchified") and k in fx:  # a permutation of the input: exact
            v = np.asarray(v)
            same = v.shape == fx[k].shape and np.array_equal(v.astype(np.float64), fx[k].astype(np.float64))
            results[k] = (0.0 if same else rel_err(v, fx[k]), EXACT)
        elif k in fx:
            results[k] = (rel_err(v, fx[k]), "tol")
    for k, v in _sched_results(fx, ref_cfg, cfg.seq_len).items():
        if k in fx:
            same = np.asarray(v).shape == fx[k].shape and np.array_equal(np.asarray(v, np.float64), fx[k].astype(np.float64))
            results[k] = (0.0 if same else rel_err(v, fx[k]), EXACT)
    vae_keys = [k for k in fx if k.startswith("vae_io/")]
    if vae_keys:
        try:
            from marval_jax.checkpoints.convert_vae import vae_parity
        except ImportError:
            vae_parity = None
        if vae_parity is None:
            for k in vae_keys:
                print(f"{k:40s} not yet covered (no VAE)", file=out)
        else:
            with jax.default_matmul_precision("float32"):
                for name, err in vae_parity(fx):
                    results[name if name.startswith("vae_io/") else f"vae_io/{name}"] = (err, "tol")
    vae_img = int(fx["vae_io/image"].shape[-1]) if "vae_io/image" in fx else None
    depths = tensor_depths(cfg, ref_cfg, vae_img)
    ok = True
    for k in sorted(results):
        err, kind = results[k]
        bound = 0.0 if kind == EXACT else tensor_tolerance(k, depths, tol)
        good = err == 0.0 if kind == EXACT else err <= bound
        ok &= good
        print(f"{k:40s} max_rel_err {err:.3e}  {'ok' if good else 'FAIL'}"
              f"{' (exact)' if kind == EXACT else f' (bound {bound:.1e})'}", file=out)
    uncovered = sorted(k for k in fx if k.startswith(("io/", "sched/")) and k not in results
                       and k not in ("io/x", "io/labels", "io/orders", "io/mask") and not k.startswith("io/net_")
                       and k not in ("io/tl_x0", "io/tl_t", "io/tl_noise", "io/pmv_t_index"))
    for k in uncovered:
        print(f"{k:40s} not recomputed  FAIL", file=out)
    ok &= not uncovered
    how = f"tol {tol:g}" if tol is not None else "float32 bounds of each chain's depth"
    print(f"parity: {'PASS' if ok else 'FAIL'} ({len(results)} tensors checked, {how})", file=out)
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_verbose_flag(ap)
    ap.add_argument("--fixture", required=True)
    ap.add_argument("--tol", type=float, default=None,
                    help="one max relative error for every tensor, instead of each chain's float32 bound")
    args = ap.parse_args(argv)
    try:
        ok = run_parity(args.fixture, args.tol)
    except (OSError, ValueError, KeyError) as e:  # a fixture that is missing or not a parity fixture
        if args.verbose:
            raise
        print(f"error: parity: cannot use --fixture={args.fixture}: {one_line(e)}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    run_cli(main)
