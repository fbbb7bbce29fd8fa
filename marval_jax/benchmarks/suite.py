"""The benchmark suite: samplers, training steps and a time breakdown of the samplers, on whatever device JAX finds.

Each measurement becomes one result dict (see `Suite.record`); the JSON file is rewritten after every result, so a
run cut short keeps what it measured. Models use random weights (MAR's init plus N(0, 0.02^2) on every parameter,
so the zero-initialised head layers do no zero arithmetic), bfloat16 compute and float32 parameters.

Measurements (per model):
  sample/teacher   MAR's sampler: 64 AR iterations, CFG (2.9 linear for MAR-B) fused into 2B rows, the head's
                   respaced reverse chain (100 steps) with CFG inside, temperature 1.
  sample/onestep   MARVAL's sampler: 64 AR iterations, one head call at t_init = 760 per token, no CFG.
  train/mar        MAR's training step (mar_loss with dropout and label drop, AdamW with the reference decay set,
                   clip 3.0, EMA), batch 256, jitted with the state donated.
  train/gsim       one generator update + one fake-score update (marval_jax.losses.gsim, default settings:
                   teacher CFG 1.2, pseudo-Huber), three MAR states (teacher frozen).
  train/rl         the RL loss (marval_jax.losses.rl) backpropagated through the one-step generator's 64-iteration
                   AR loop (rl.remat on, all iterations carry gradient); the tokenizer decode and the reward model are
                   replaced by a reshape and a closed-form reward, so only the generator is timed.
  breakdown/*      the sampler with the predictor replaced by a slice of z (transformer passes + token gathers and
                   scatters of the AR loop) and the predictor calls alone on fixed conditions (head loop), each one
                   compiled loop over the same segments, so that transformer + head + rest = sampler.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
import time
import traceback
from types import SimpleNamespace
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from marval_jax.benchmarks import flops as F
from marval_jax.benchmarks.timing import Deadline, compile_timed, device_memory, matmul_tflops, time_calls, time_steps
from marval_jax.models import mar as mar_lib
from marval_jax.models.mar import MAR, MARConfig, train_encoder_len, unpatchify
from marval_jax.sampling.ar_sampler import SamplerSpec, make_sampler, onestep_predictor, teacher_predictor
from marval_jax.sampling.schedule import ar_schedule, plan_segments

IMAGENET = mar_lib.IMAGENET_256  # the released MAR-B/L/H (configs/mar.py uses the same table)
SIZES = mar_lib.RELEASED_SIZES
TINY = dict(img_size=32, vae_stride=4, patch_size=1, vae_embed_dim=16, buffer_size=4, class_num=10,
            encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2, diffloss_d=1, diffloss_w=32)
SAMPLE_CFG = {"base": 2.9, "large": 3.0, "huge": 3.2, "tiny": 2.9}
REMAT = {"base": False, "large": True, "huge": True, "tiny": False}  # configs/mar.py: remat for large / huge

# Dense bf16 peak (datasheet) and the measured bf16 matmul rate on this workplace's H200 (KINDS.md).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0}
MATMUL_REF_TFLOPS = {"H200": 795.0}

# The issue's targets (one H200, bf16, MAR-B, ImageNet-256 shapes) and the PyTorch reference on the same H200.
TARGETS = {
    ("base", "sample/onestep", 256): ("time_s", "<=", 2.5),
    ("base", "sample/onestep", 1): ("time_s", "<=", 0.05),
    ("base", "sample/teacher", 256): ("time_s", "<=", 12.0),
    ("base", "sample/teacher", 1): ("time_s", "<=", 1.0),
    ("base", "train/mar", 256): ("images_per_s", ">=", 900.0),
}
COMPILE_TARGET_S = 60.0  # each MAR-B sampler
PYTORCH_REF = {
    ("base", "sample/teacher", 256): "43.3 s",
    ("base", "sample/teacher", 1): "25.5 s",
    ("base", "sample/onestep", 256): "10.2 s",
    ("base", "sample/onestep", 1): "1.72 s",
    ("base", "train/mar", 256): "0.559 s/step (458 img/s)",
}


@dataclasses.dataclass
class Settings:
    models: list[str]
    what: list[str]
    batches: list[int]
    out: str | None
    table: str | None
    quick: bool = False
    num_iter: int = 64
    head_steps: str = "100"
    t_init: int = 760
    num_buckets: int = 4
    train_batch: int = 256
    gsim_batch: int = 256
    rl_batch: int = 32
    rl_num_iter: int = 64
    train_steps: tuple[str, ...] = ("mar", "gsim", "rl")
    breakdown_batch: int | None = None
    time_budget_s: float | None = None
    min_reps: int = 2
    target_s: float = 3.0
    seed: int = 0

    @classmethod
    def quick_settings(cls, **kw) -> "Settings":
        """Tiny shapes for a CPU smoke run (tests): every code path, seconds of compute."""
        base = dict(models=["tiny"], num_iter=2, head_steps="2", num_buckets=1, train_batch=2, gsim_batch=2,
                    rl_batch=2, rl_num_iter=2, min_reps=1, target_s=0.0, quick=True)
        base.update(kw)
        base["batches"] = [2]  # one batch size: every code path once
        return cls(**base)


def model_config(name: str) -> MARConfig:
    common = dict(mlp_ratio=4.0, attn_dropout=0.1, proj_dropout=0.1, label_drop_prob=0.1, dtype="bfloat16")
    if name == "tiny":
        return MARConfig(**common, **TINY, remat=False)
    if name not in SIZES:
        raise ValueError(f"--models takes base, large, huge (or tiny), got {name!r}")
    return MARConfig(**common, **IMAGENET, **SIZES[name], remat=REMAT[name])


def random_state(cfg: MARConfig, seed: int = 0):
    """(graphdef, state): MAR's init (one jitted program, so the arrays are made on the default device), then
    N(0, 0.02^2) added to every floating parameter."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: MAR(cfg, rngs=nnx.Rngs(seed))))

    @jax.jit
    def init(key):
        state = nnx.state(MAR(cfg, rngs=nnx.Rngs(seed)))
        leaves, treedef = jax.tree_util.tree_flatten(state)
        keys = jax.random.split(key, len(leaves))
        new = [x + 0.02 * jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
               for x, k in zip(leaves, keys)]
        return jax.tree_util.tree_unflatten(treedef, new)

    return graphdef, init(jax.random.key(seed + 1))


def copy_tree(tree):
    return jax.tree.map(jnp.copy, tree)


def _device_info() -> dict:
    d = jax.devices()[0]
    return {"kind": d.device_kind, "platform": d.platform, "count": jax.device_count()}


def _versions() -> dict:
    import flax
    import optax
    out = {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
           "python": platform.python_version()}
    try:
        import jaxlib
        out["jaxlib"] = jaxlib.__version__
    except Exception:  # noqa: BLE001
        pass
    return out


def _lookup(table: dict, kind: str):
    for k, v in table.items():
        if k in kind:
            return v
    return None


class Suite:
    def __init__(self, settings: Settings):
        self.s = settings
        self.deadline = Deadline(settings.time_budget_s)
        kind = jax.devices()[0].device_kind
        self.peak = _lookup(PEAK_TFLOPS, kind)
        self.matmul_ref = _lookup(MATMUL_REF_TFLOPS, kind)
        self.report: dict[str, Any] = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": _device_info(), "versions": _versions(), "argv": sys.argv,
            "settings": dataclasses.asdict(settings),
            "peaks": {"bf16_dense_peak_tflops": self.peak, "matmul_reference_tflops": self.matmul_ref},
            "results": [],
        }

    # -- bookkeeping -----------------------------------------------------------------------------------------------
    def write(self) -> None:
        if self.s.out:
            os.makedirs(os.path.dirname(os.path.abspath(self.s.out)), exist_ok=True)
            tmp = self.s.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.report, f, indent=1, default=_json_default)
            os.replace(tmp, self.s.out)

    def record(self, entry: dict) -> dict:
        entry["device_memory_after"] = device_memory()
        entry["elapsed_s"] = round(self.deadline.elapsed(), 2)
        self.report["results"].append(entry)
        self.write()
        t = entry.get("time_s")
        print(f"[{entry['elapsed_s']:7.1f}s] {entry['model']:5s} {entry['name']:34s} b={entry.get('batch')!s:4s} "
              f"{entry['status']:8s} " + (f"time {t:.4g}s" if t is not None else "") +
              (f" compile {entry['compile']['total_s']:.1f}s" if entry.get("compile") else "") +
              (f" MFU {entry['mfu_peak']:.1%}" if entry.get("mfu_peak") else ""), flush=True)
        return entry

    def _mfu(self, entry: dict, flops: float, seconds: float) -> None:
        entry["flops"] = flops
        entry["tflops_per_s"] = flops / seconds / 1e12
        entry["mfu_peak"] = flops / seconds / (self.peak * 1e12) if self.peak else None
        entry["mfu_matmul_ref"] = flops / seconds / (self.matmul_ref * 1e12) if self.matmul_ref else None

    def guarded(self, model: str, name: str, batch: int | None, fn: Callable[[dict], None],
                need_s: float = 30.0) -> dict:
        entry: dict[str, Any] = {"model": model, "name": name, "batch": batch}
        if self.deadline.remaining() < need_s:
            entry["status"] = "skipped"
            entry["reason"] = f"time budget: {self.deadline.remaining():.0f} s left, {need_s:.0f} s needed"
            return self.record(entry)
        try:
            fn(entry)
            entry["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - one failed measurement must not lose the others
            entry["status"] = "error"
            entry["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
            entry["traceback"] = traceback.format_exc()[-4000:]
        return self.record(entry)

    # -- measurements ----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        s = self.s
        if jax.devices()[0].platform == "gpu":
            try:
                self.report["peaks"]["matmul_measured_tflops"] = matmul_tflops()
            except Exception as e:  # noqa: BLE001
                self.report["peaks"]["matmul_measured_error"] = repr(e)
        self.write()
        for name in s.models:
            cfg = model_config(name)
            t0 = time.perf_counter()
            graphdef, state = random_state(cfg, s.seed)
            jax.block_until_ready(state)
            self.report.setdefault("init_s", {})[name] = time.perf_counter() - t0
            nparams = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state))
            self.report.setdefault("params", {})[name] = nparams
            self.report.setdefault("model_configs", {})[name] = dataclasses.asdict(cfg)
            m = ModelBench(self, name, cfg, graphdef, state)
            # priority order (a time budget cuts from the end): samplers at the largest batch, MAR training,
            # samplers at the other batches, the breakdown, GSIM, RL
            batches = sorted(s.batches, reverse=True)
            for i, b in enumerate(batches):
                if "sample" in s.what:
                    for kind in ("teacher", "onestep"):
                        self.guarded(name, f"sample/{kind}", b, lambda e, k=kind, b=b: m.sampler(e, k, b))
                if i == 0 and "train" in s.what and "mar" in s.train_steps:
                    self.guarded(name, "train/mar", s.train_batch, m.train_mar)
            if "breakdown" in s.what:
                bb = s.breakdown_batch or max(s.batches)
                for kind in ("teacher", "onestep"):
                    self.guarded(name, f"breakdown/{kind}/transformer_loop", bb,
                                 lambda e, k=kind: m.transformer_loop(e, k, bb))
                    self.guarded(name, f"breakdown/{kind}/head_loop", bb, lambda e, k=kind: m.head_loop(e, k, bb))
            if "train" in s.what and "gsim" in s.train_steps:
                self.guarded(name, "train/gsim", s.gsim_batch, m.train_gsim)
            if "train" in s.what and "rl" in s.train_steps:
                self.guarded(name, "train/rl", s.rl_batch, m.train_rl)
            del m, state
        self.report["total_s"] = self.deadline.elapsed()
        self.write()
        return self.report


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _train_namespace(batch: int) -> SimpleNamespace:
    """configs/common.train_config's defaults (the MAR reference's optimizer)."""
    return SimpleNamespace(lr=-1.0, blr=1e-4, global_batch_size=batch, warmup_steps=100, num_steps=1000,
                           lr_schedule="constant", min_lr=0.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.02,
                           grad_clip=3.0, ema_decay=0.9999)


class ModelBench:
    def __init__(self, suite: Suite, name: str, cfg: MARConfig, graphdef, state):
        self.suite, self.s, self.name, self.cfg = suite, suite.s, name, cfg
        self.graphdef, self.state = graphdef, state
        self.cfg_scale = SAMPLE_CFG[name]
        self.key = jax.random.key(self.s.seed + 7)

    # -- samplers ------------------------------------------------------------------------------------------------
    def spec(self, kind: str) -> SamplerSpec:
        return SamplerSpec(num_iter=self.s.num_iter, cfg=self.cfg_scale if kind == "teacher" else 1.0,
                           cfg_schedule="linear", num_buckets=self.s.num_buckets)

    def predictor(self, kind: str):
        return teacher_predictor(self.s.head_steps, 1.0) if kind == "teacher" else onestep_predictor(self.s.t_init)

    def head_calls(self, kind: str) -> int:
        if kind != "teacher":
            return 1
        from marval_jax.diffusion.gaussian import GaussianDiffusion
        return GaussianDiffusion.create(self.s.head_steps).num_timesteps

    def sampler_settings(self, kind: str) -> dict:
        return dict(num_iter=self.s.num_iter, cfg=self.spec(kind).cfg, cfg_schedule="linear",
                    num_buckets=self.s.num_buckets, head_steps=self.head_calls(kind),
                    t_init=self.s.t_init if kind == "onestep" else None,
                    segments=[dataclasses.asdict(g) for g in plan_segments(
                        ar_schedule(self.cfg.seq_len, self.s.num_iter), self.cfg.buffer_size, self.s.num_buckets)])

    def labels(self, b: int) -> jax.Array:
        return jnp.arange(b, dtype=jnp.int32) % self.cfg.class_num

    def _time_program(self, entry: dict, jitted, args_fn: Callable[[jax.Array], tuple], b: int) -> Any:
        """Compile `jitted` for args_fn(key), time calls with fresh keys; returns one output."""
        keys = jax.random.split(self.key, 64)
        compiled, comp = compile_timed(jitted, *args_fn(keys[0]))
        entry["compile"] = comp
        counter = iter(range(1, 10 ** 9))
        last = {}

        def call():
            last["out"] = compiled(*args_fn(keys[next(counter) % 64]))
            return last["out"]

        t = time_calls(call, min_reps=self.s.min_reps, target_s=self.s.target_s, deadline=self.suite.deadline)
        entry["timing"] = t
        entry["time_s"] = t["median_s"]
        entry["per_image_s"] = t["median_s"] / b
        entry["images_per_s"] = b / t["median_s"]
        return last["out"]

    def sampler(self, entry: dict, kind: str, b: int) -> None:
        fn = make_sampler(self.graphdef, self.spec(kind), self.predictor(kind), seq_len=self.cfg.seq_len,
                          buffer_size=self.cfg.buffer_size, token_dim=self.cfg.token_dim)
        labels = self.labels(b)
        out = self._time_program(entry, fn, lambda k: (self.state, labels, k), b)
        entry["output_finite_fraction"] = float(jnp.mean(jnp.isfinite(out)))
        entry["settings"] = self.sampler_settings(kind)
        fl = F.sampler_flops(self.cfg, batch=b, num_iter=self.s.num_iter, cfg_scale=self.spec(kind).cfg,
                             head_calls=self.head_calls(kind), num_buckets=self.s.num_buckets)
        entry["flops_detail"] = fl
        self.suite._mfu(entry, fl["total"], entry["time_s"])

    def transformer_loop(self, entry: dict, kind: str, b: int) -> None:
        """The sampler with the predictor replaced by a slice of the condition: transformer passes + loop glue."""
        c = self.cfg.token_dim

        def slice_predictor(model, zc, zu, cfg_scale, rng):
            out = zc[:, :c].astype(jnp.float32)
            return out if zu is None else out + zu[:, :c].astype(jnp.float32)

        fn = make_sampler(self.graphdef, self.spec(kind), slice_predictor, seq_len=self.cfg.seq_len,
                          buffer_size=self.cfg.buffer_size, token_dim=c)
        labels = self.labels(b)
        self._time_program(entry, fn, lambda k: (self.state, labels, k), b)
        fl = F.sampler_flops(self.cfg, batch=b, num_iter=self.s.num_iter, cfg_scale=self.spec(kind).cfg,
                             head_calls=self.head_calls(kind), num_buckets=self.s.num_buckets)
        entry["flops_detail"] = {k: fl[k] for k in ("transformer", "transformer_useful")}
        self.suite._mfu(entry, fl["transformer"], entry["time_s"])

    def head_loop(self, entry: dict, kind: str, b: int) -> None:
        """The predictor calls of the sampler's segments alone, on fixed random conditions (2, B, S, D)."""
        cfg, spec, predictor = self.cfg, self.spec(kind), self.predictor(kind)
        sched = ar_schedule(cfg.seq_len, spec.num_iter)
        segments = plan_segments(sched, cfg.buffer_size, spec.num_buckets)
        cfg_arr = sched.cfg(spec.cfg, spec.cfg_schedule).astype(np.float32)
        use_cfg = spec.cfg != 1.0
        graphdef = self.graphdef

        @jax.jit
        def head_loop(state, z, rng):
            model = nnx.merge(graphdef, state)
            acc = jnp.zeros((), jnp.float32)
            for seg in segments:
                def body(step, acc, seg=seg):
                    p = seg.pred_cap
                    shift = (acc * 1e-12).astype(z.dtype)  # a loop-carried dependency: nothing is hoisted
                    zc = z[0][:, :p].reshape(b * p, -1) + shift
                    zu = z[1][:, :p].reshape(b * p, -1) + shift if use_cfg else None
                    out = predictor(model, zc, zu, jnp.asarray(cfg_arr)[step], jax.random.fold_in(rng, step))
                    return acc + jnp.mean(out)
                acc = jax.lax.fori_loop(seg.start, seg.stop, body, acc)
            return acc

        z = jax.random.normal(jax.random.key(3), (2, b, cfg.seq_len, cfg.decoder_embed_dim), jnp.float32)
        z = z.astype(cfg.jnp_dtype)  # [conditional, unconditional] conditions
        self._time_program(entry, head_loop, lambda k: (self.state, z, k), b)
        fl = F.sampler_flops(cfg, batch=b, num_iter=spec.num_iter, cfg_scale=spec.cfg,
                             head_calls=self.head_calls(kind), num_buckets=spec.num_buckets)
        entry["flops_detail"] = {k: fl[k] for k in ("head", "head_useful")}
        self.suite._mfu(entry, fl["head"], entry["time_s"])

    # -- training ------------------------------------------------------------------------------------------------
    def _batch(self, b: int) -> dict:
        k1, k2 = jax.random.split(jax.random.key(11))
        return {"tokens": jax.random.normal(k1, (b, self.cfg.seq_len, self.cfg.token_dim), jnp.float32),
                "labels": jax.random.randint(k2, (b,), 0, self.cfg.class_num, jnp.int32)}

    def _train_timing(self, entry: dict, jitted, state, extra_args: tuple, b: int, steps: int) -> None:
        compiled, comp = compile_timed(jitted, state, *extra_args)
        entry["compile"] = comp
        t, _ = time_steps(lambda st: compiled(st, *extra_args), state, warmup=2 if not self.s.quick else 1,
                          steps=steps, rounds=3 if not self.s.quick else 1, deadline=self.suite.deadline)
        entry["timing"] = t
        entry["time_s"] = t["median_s"]
        entry["images_per_s"] = b / t["median_s"]
        entry["finite_loss"] = t["finite_loss"]

    def train_mar(self, entry: dict) -> None:
        import optax
        from marval_jax.losses.mar_loss import mar_loss
        from marval_jax.train.optimizer import ema_update, mar_optimizer
        cfg, b, graphdef = self.cfg, self.s.train_batch, self.graphdef
        tc = _train_namespace(b)
        tx = mar_optimizer(tc, self.state)
        enc_len = train_encoder_len(cfg, 0.7)
        params = copy_tree(self.state)
        state = {"params": params, "opt_state": tx.init(params), "ema": copy_tree(params),
                 "step": jnp.zeros((), jnp.int32), "rng": jax.random.key(5)}

        def train_step(state, batch):
            key = jax.random.fold_in(state["rng"], state["step"])

            def loss_fn(params):
                model = nnx.merge(graphdef, params)
                return mar_loss(model, batch["tokens"], batch["labels"], key, mask_ratio_min=0.7,
                                diffusion_batch_mul=4, enc_len=enc_len)

            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            ema = ema_update(state["ema"], params, tc.ema_decay)
            metrics = dict(aux, loss=loss, grad_norm=optax.global_norm(grads))
            return dict(state, params=params, opt_state=opt_state, ema=ema, step=state["step"] + 1), metrics

        self._train_timing(entry, jax.jit(train_step, donate_argnums=0), state, (self._batch(b),), b,
                           steps=5 if not self.s.quick else 2)
        fl = F.mar_train_flops(cfg, batch=b, mask_ratio_min=0.7, diffusion_batch_mul=4)
        entry["flops_detail"] = fl
        entry["settings"] = dict(mask_ratio_min=0.7, diffusion_batch_mul=4, enc_len=enc_len, remat=cfg.remat,
                                 dropout=True, optimizer="adamw b2 0.95 wd 0.02 clip 3.0 + EMA", data="fixed batch")
        self.suite._mfu(entry, fl["total"], entry["time_s"])

    def train_gsim(self, entry: dict) -> None:
        import optax
        from marval_jax.losses.gsim import make_gsim_losses
        from marval_jax.train.optimizer import make_optimizer
        cfg, b, graphdef = self.cfg, self.s.gsim_batch, self.graphdef
        losses = make_gsim_losses(None, {"t_init": self.s.t_init, "trainable": "all"}, cfg)
        tx = make_optimizer(1e-5, warmup_steps=0, total_steps=1000, b1=0.0, b2=0.99)
        gen, fake = copy_tree(self.state), copy_tree(self.state)
        teacher = copy_tree(self.state)
        state = {"gen": gen, "fake": fake, "opt_gen": tx.init(gen), "opt_fake": tx.init(fake),
                 "step": jnp.zeros((), jnp.int32), "rng": jax.random.key(6)}

        def step(state, teacher, batch):
            key = jax.random.fold_in(state["rng"], state["step"])
            k_gen, k_fake = jax.random.split(key)
            (lg, mg), gg = jax.value_and_grad(losses.generator_loss, argnums=1, has_aux=True)(
                graphdef, state["gen"], state["fake"], teacher, batch, k_gen)
            upd, opt_gen = tx.update(gg, state["opt_gen"], state["gen"])
            gen = optax.apply_updates(state["gen"], upd)
            (lf, mf), gf = jax.value_and_grad(losses.fake_score_loss, argnums=1, has_aux=True)(
                graphdef, state["fake"], gen, batch, k_fake)
            upd, opt_fake = tx.update(gf, state["opt_fake"], state["fake"])
            fake = optax.apply_updates(state["fake"], upd)
            new = dict(state, gen=gen, fake=fake, opt_gen=opt_gen, opt_fake=opt_fake, step=state["step"] + 1)
            return new, {"loss": lg + lf, "gen_loss": lg, "fake_loss": lf}

        self._train_timing(entry, jax.jit(step, donate_argnums=0), state, (teacher, self._batch(b)), b,
                           steps=3 if not self.s.quick else 1)
        st = losses.settings
        fl = F.gsim_step_flops(cfg, batch=b, mask_ratio_min=st.mask_ratio_min, guidance=st.guidance_scale != 1.0)
        entry["flops_detail"] = fl
        entry["settings"] = dict(dataclasses.asdict(st), enc_len=losses.enc_len,
                                 step="one generator update + one fake-score update", data="fixed batch")
        self.suite._mfu(entry, fl["total"], entry["time_s"])

    def train_rl(self, entry: dict) -> None:
        import optax
        from marval_jax.losses.rl import make_rl_loss
        from marval_jax.train.optimizer import make_optimizer
        cfg, b, graphdef = self.cfg, self.s.rl_batch, self.graphdef
        rl_cfg = SimpleNamespace(num_iter=self.s.rl_num_iter, backprop_steps=-1, remat=True, reward_scale=1.0,
                                 regularizer="none", reg_weight=0.0, prompt_template="a photo of a {class}",
                                 num_buckets=self.s.num_buckets)
        gen_cfg = SimpleNamespace(t_init=self.s.t_init, trainable="all")

        def decode(tokens):  # stand-in for the frozen tokenizer: latent image NHWC
            return jnp.transpose(unpatchify(tokens, cfg.patch_size, cfg.vae_embed_dim), (0, 2, 3, 1))

        def reward(images, labels):  # stand-in for a frozen differentiable reward model
            del labels
            return -jnp.mean(jnp.square(jnp.tanh(images) - 0.5), axis=(1, 2, 3))

        loss_fn = make_rl_loss(rl_cfg, gen_cfg, cfg, decode, reward)
        tx = make_optimizer(1e-6, warmup_steps=0, total_steps=1000)
        gen = copy_tree(self.state)
        state = {"gen": gen, "opt": tx.init(gen), "step": jnp.zeros((), jnp.int32), "rng": jax.random.key(8)}

        def step(state, labels):
            key = jax.random.fold_in(state["rng"], state["step"])
            (loss, m), g = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(graphdef, state["gen"], None,
                                                                                labels, key)
            upd, opt = tx.update(g, state["opt"], state["gen"])
            return dict(state, gen=optax.apply_updates(state["gen"], upd), opt=opt, step=state["step"] + 1), m

        self._train_timing(entry, jax.jit(step, donate_argnums=0), state, (self.labels(b),), b,
                           steps=2 if not self.s.quick else 1)
        fl = F.rl_step_flops(cfg, batch=b, num_iter=rl_cfg.num_iter, backprop_steps=-1, remat=True,
                             num_buckets=self.s.num_buckets)
        entry["flops_detail"] = fl
        entry["settings"] = dict(vars(rl_cfg), t_init=self.s.t_init,
                                 reward="stand-in (reshape decode + closed-form reward); reward model not timed")
        self.suite._mfu(entry, fl["total"], entry["time_s"])


# -- report ----------------------------------------------------------------------------------------------------------
BEGIN, END = "<!-- BEGIN GENERATED BENCHMARK TABLES -->", "<!-- END GENERATED BENCHMARK TABLES -->"


def _fmt(x, spec=".3g", unit=""):
    return "-" if x is None else f"{x:{spec}}{unit}"


def _gib(entry) -> str:
    mem = (entry.get("compile") or {}).get("memory") or {}
    b = mem.get("program_peak_bytes")
    return "-" if b is None else f"{b / 2 ** 30:.2f}"


def _target(entry) -> tuple[str, str]:
    t = TARGETS.get((entry["model"], entry["name"], entry.get("batch")))
    if t is None or entry.get("status") != "ok":
        return "", ""
    field, op, val = t
    got = entry.get(field)
    ok = got <= val if op == "<=" else got >= val
    unit = " s" if field == "time_s" else " img/s"
    return f"{op} {val:g}{unit}", "met" if ok else "missed"


def render_markdown(report: dict) -> str:
    res = report["results"]
    peaks = report.get("peaks", {})
    dev = report["device"]
    lines = [BEGIN, "",
             f"Measured {report['date'][:10]} on **{dev['kind']}** ({dev['platform']}, {dev['count']} device(s)), "
             f"jax {report['versions'].get('jax')}, flax {report['versions'].get('flax')}; suite wall time "
             f"{_fmt(report.get('total_s'), '.0f', ' s')}. MFU = analytic matmul FLOPs / time / peak, against the "
             f"dense bf16 peak ({_fmt(peaks.get('bf16_dense_peak_tflops'), '.0f')} TFLOP/s) and the measured bf16 "
             f"matmul rate ({_fmt(peaks.get('matmul_reference_tflops'), '.0f')} TFLOP/s; this run measured "
             f"{_fmt(peaks.get('matmul_measured_tflops'), '.0f')} TFLOP/s on an 8192^3 product). "
             "Memory = XLA's buffer assignment of the program (arguments + outputs + temporaries).", ""]

    samp = [e for e in res if e["name"].startswith("sample/")]
    if samp:
        lines += ["### Sampling", "",
                  "| model | sampler | batch | s / batch | s / image | compile s | memory GiB | TFLOP | MFU (peak) "
                  "| MFU (matmul) | target | PyTorch H200 | status |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in samp:
            tgt, ok = _target(e)
            comp = (e.get("compile") or {}).get("total_s")
            if e["status"] == "ok" and e["model"] == "base" and comp is not None:
                ok = (ok + ", " if ok else "") + ("compile met" if comp < COMPILE_TARGET_S else "compile missed")
            lines.append(f"| {e['model']} | {e['name'][7:]} | {e.get('batch')} | {_fmt(e.get('time_s'), '.3f')} | "
                         f"{_fmt(e.get('per_image_s'), '.4f')} | {_fmt(comp, '.1f')} | {_gib(e)} | "
                         f"{_fmt((e.get('flops') or 0) / 1e12 if e.get('flops') else None, '.1f')} | "
                         f"{_fmt(e.get('mfu_peak'), '.1%')} | {_fmt(e.get('mfu_matmul_ref'), '.1%')} | {tgt} | "
                         f"{PYTORCH_REF.get((e['model'], e['name'], e.get('batch')), '')} | "
                         f"{e['status'] if e['status'] != 'ok' else ok or 'ok'} |")
        lines.append("")

    train = [e for e in res if e["name"].startswith("train/")]
    if train:
        lines += ["### Training steps", "",
                  "| model | step | batch | s / step | images / s | compile s | memory GiB | TFLOP / step | "
                  "MFU (peak) | MFU (matmul) | target | PyTorch H200 | status |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in train:
            tgt, ok = _target(e)
            lines.append(f"| {e['model']} | {e['name'][6:]} | {e.get('batch')} | {_fmt(e.get('time_s'), '.3f')} | "
                         f"{_fmt(e.get('images_per_s'), '.0f')} | "
                         f"{_fmt((e.get('compile') or {}).get('total_s'), '.1f')} | {_gib(e)} | "
                         f"{_fmt((e.get('flops') or 0) / 1e12 if e.get('flops') else None, '.1f')} | "
                         f"{_fmt(e.get('mfu_peak'), '.1%')} | {_fmt(e.get('mfu_matmul_ref'), '.1%')} | {tgt} | "
                         f"{PYTORCH_REF.get((e['model'], e['name'], e.get('batch')), '')} | "
                         f"{e['status'] if e['status'] != 'ok' else ok or 'ok'} |")
        missing = {"train/mar", "train/gsim", "train/rl"} - {e["name"] for e in train}
        for name in sorted(missing):
            lines.append(f"| - | {name[6:]} | - | - | - | - | - | - | - | - | - | - | not yet measured |")
        lines.append("")

    brk = [e for e in res if e["name"].startswith("breakdown/")]
    if brk:
        lines += ["### Where the sampler time goes", "",
                  "| model | sampler | batch | component | time s | share of sampler | TFLOP | TFLOP/s | MFU (peak) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for e in brk:
            _, kind, comp = e["name"].split("/")
            full = next((x for x in samp if x["name"] == f"sample/{kind}" and x.get("batch") == e.get("batch")
                         and x["model"] == e["model"] and x.get("time_s")), None)
            share = e["time_s"] / full["time_s"] if full and e.get("time_s") else None
            lines.append(f"| {e['model']} | {kind} | {e.get('batch')} | {comp.replace('_', ' ')} | "
                         f"{_fmt(e.get('time_s'), '.3f')} | {_fmt(share, '.0%')} | "
                         f"{_fmt((e.get('flops') or 0) / 1e12 if e.get('flops') else None, '.1f')} | "
                         f"{_fmt(e.get('tflops_per_s'), '.0f')} | {_fmt(e.get('mfu_peak'), '.1%')} |")
        for e in samp:
            parts = [x for x in brk if x["model"] == e["model"] and x.get("batch") == e.get("batch")
                     and x["name"].split("/")[1] == e["name"][7:] and x.get("time_s")]
            if len(parts) == 2 and e.get("time_s"):
                rest = e["time_s"] - sum(x["time_s"] for x in parts)
                lines.append(f"| {e['model']} | {e['name'][7:]} | {e.get('batch')} | rest (sampler - both) | "
                             f"{rest:.3f} | {rest / e['time_s']:.0%} | | | |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write_table(report: dict, path: str) -> None:
    """Writes the generated tables into `path` between the markers, keeping any hand-written text around them."""
    block = render_markdown(report)
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def device_slug() -> str:
    kind = jax.devices()[0].device_kind.lower()
    for key in ("h200", "h100", "a100", "l4", "v5", "v6", "v4"):
        if key in kind:
            return key
    return "".join(ch if ch.isalnum() else "_" for ch in kind).strip("_") or "device"


def main_run(settings: Settings) -> dict:
    if settings.out is None:
        settings.out = os.path.join("docs", "benchmarks", f"{device_slug()}.json")
    report = Suite(settings).run()
    if settings.table:
        write_table(report, settings.table)
    return report
