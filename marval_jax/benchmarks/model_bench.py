"""One model's measurements for the benchmark suite (marval_jax/benchmarks/suite.py describes the rows): the model
configurations, random weights, and `ModelBench`, which builds, compiles and times each row's program and fills its
result dict (samplers, KV-cached samplers, the sampler breakdown, one transformer block's parts, training steps)."""
from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from marval_jax.benchmarks import flops as F
from marval_jax.benchmarks import random_init
from marval_jax.benchmarks.timing import MemoryPoller, compile_timed, time_calls, time_steps
from marval_jax.models import mar as mar_lib
from marval_jax.models.mar import MAR, MARConfig, train_encoder_len, unpatchify
from marval_jax.models.transformer import Block, attention_core, cast_linear_params
from marval_jax.parallel.compiler_options import gpu_compiler_options, jit_options
from marval_jax.programs.demo import ASSETS as SHIPPED_ASSETS, best_teacher_cfg
from marval_jax.sampling.ar_sampler import SamplerSpec, make_sampler, onestep_predictor, teacher_predictor
from marval_jax.sampling.from_config import sampler_spec
from marval_jax.sampling.schedule import ar_schedule, plan_segments

if TYPE_CHECKING:
    from marval_jax.benchmarks.runner import Suite

IMAGENET = mar_lib.IMAGENET_256  # the released MAR-B/L/H (configs/mar.py uses the same table)
SIZES = mar_lib.RELEASED_SIZES
TINY = dict(img_size=32, vae_stride=4, patch_size=1, vae_embed_dim=16, buffer_size=4, class_num=10,
            encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2, diffloss_d=1, diffloss_w=32)
# the samplers' CFG scale per model: the released models' (mar_reference.md), the shipped fmnist_l teacher's
# (marval_jax/assets/sampling.json, as the demo reads it)
SAMPLE_CFG = {"base": 2.9, "large": 3.0, "huge": 3.2, "tiny": 2.9, "fmnist_l": best_teacher_cfg(SHIPPED_ASSETS)}
REMAT = {"base": False, "large": True, "huge": True, "tiny": False, "fmnist_l": False}  # as configs/mar.py sets it
MARGIN_S = 10.0            # added to every estimate (tracing, transfers)


def model_config(name: str) -> MARConfig:
    common = dict(mlp_ratio=4.0, attn_dropout=0.1, proj_dropout=0.1, label_drop_prob=0.1, dtype="bfloat16")
    if name == "tiny":
        return MARConfig(**common, **TINY, remat=False)
    if name == "fmnist_l":
        return MARConfig(**common, **mar_lib.FMNIST_L, remat=False)
    if name not in SIZES:
        raise ValueError(f"--models takes base, large, huge, fmnist_l (or tiny), got {name!r}")
    return MARConfig(**common, **IMAGENET, **SIZES[name], remat=REMAT[name])


def bench_spec(s, kind: str, cfg_scale: float, cache="none") -> SamplerSpec:
    """A sampler row's SamplerSpec under the suite's settings `s` (the teacher guided at `cfg_scale`, the one-step
    sampler unguided); `cache` its KV-cache policy, carried by the spec as sample.kv_cache's is."""
    return sampler_spec(s.num_iter, cfg_scale if kind == "teacher" else 1.0, "linear", s.num_buckets, cache=cache)


def bench_predictor(s, kind: str):
    """A sampler row's predictor: the teacher's respaced head chain (temperature 1) or the one-step head call."""
    return teacher_predictor(s.head_steps, 1.0) if kind == "teacher" else onestep_predictor(s.t_init)


def rl_bench_step(cfg: MARConfig, graphdef, *, num_iter: int, num_buckets: int, t_init: int, remat: bool):
    """The suite's RL step: the loss of losses/rl.py over `num_iter` AR iterations in `num_buckets` encoder-length
    buckets, with stand-ins for the frozen tokenizer (a reshape) and reward (closed form), so the row times the
    generator's loop alone; Adam at 1e-6. Returns (step(state, labels) -> (state, metrics), init_state(gen params)
    -> state, loss_fn, rl_cfg)."""
    import optax
    from marval_jax.losses.rl import make_rl_loss
    from marval_jax.train.optimizer import make_optimizer
    rl_cfg = SimpleNamespace(num_iter=num_iter, backprop_steps=-1, remat=remat, reward_scale=1.0,
                             regularizer="none", reg_weight=0.0, prompt_template="a photo of a {class}")
    # the loop's buckets as the flop count assumes (without a spec the loss takes SamplerSpec's default)
    spec = sampler_spec(num_iter, num_buckets=num_buckets, iter_field="rl.num_iter")
    gen_cfg = SimpleNamespace(t_init=t_init, trainable="all")

    def decode(tokens):  # stand-in for the frozen tokenizer: latent image NHWC
        return jnp.transpose(unpatchify(tokens, cfg.patch_size, cfg.vae_embed_dim), (0, 2, 3, 1))

    def reward(images, labels):  # stand-in for a frozen differentiable reward model
        del labels
        return -jnp.mean(jnp.square(jnp.tanh(images) - 0.5), axis=(1, 2, 3))

    loss_fn = make_rl_loss(rl_cfg, gen_cfg, cfg, decode, reward, spec=spec)
    tx = make_optimizer(1e-6, warmup_steps=0, total_steps=1000)

    def init_state(gen):
        return {"gen": gen, "opt": tx.init(gen), "step": jnp.zeros((), jnp.int32), "rng": jax.random.key(8)}

    def step(state, labels):
        key = jax.random.fold_in(state["rng"], state["step"])
        (loss, m), g = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(graphdef, state["gen"], None,
                                                                            labels, key)
        upd, opt = tx.update(g, state["opt"], state["gen"])
        return dict(state, gen=optax.apply_updates(state["gen"], upd), opt=opt, step=state["step"] + 1), m

    return step, init_state, loss_fn, rl_cfg


def random_state(cfg: MARConfig, seed: int = 0):
    """(graphdef, state) of a MAR with random weights: the shapes from `nnx.eval_shape` (nothing runs), every
    parameter drawn on the host (`random_init.param_rule`: N(0, 0.02^2), LayerNorm scales 1 + N(0, 0.02^2)) and
    copied to the default device leaf by leaf. No initialiser is compiled: jitting MAR's own init as one program
    did not finish compiling for MAR-B within the H200 call's 435 s (2026-11-29)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MAR(cfg, rngs=nnx.Rngs(seed))))
    return graphdef, random_init.random_like(abstract, seed=seed + 1, rule=random_init.param_rule)


def copy_tree(tree):
    return jax.tree.map(jnp.copy, tree)


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
        self.first_outputs: dict[tuple[str, int], jax.Array] = {}  # sampler outputs of the first key, to compare
        self._causal_graphdef = None
        self._block = {}  # (attention_impl, kernels) -> (graphdef, state) of the block/* rows' Block

    @property
    def causal_graphdef(self):
        """The same parameters with attention="causal" (the causal model has the same parameter tree)."""
        if self._causal_graphdef is None:
            ccfg = dataclasses.replace(self.cfg, attention="causal")
            self._causal_graphdef = nnx.graphdef(nnx.eval_shape(lambda: MAR(ccfg, rngs=nnx.Rngs(self.s.seed))))
        return self._causal_graphdef

    # -- time estimates ------------------------------------------------------------------------------------------
    def est_sampler_call(self, kind: str, b: int) -> float:
        """One sampler call: the measured uncached sampler at this batch if any, else its FLOPs at the assumed rate
        plus a latency floor (per block ~50 us, per head call ~150 us of kernel launches in the sequential chain)."""
        done = self.suite.find(self.name, f"sample/{kind}", b)
        if done is not None:
            return done["time_s"]
        fl = F.sampler_flops(self.cfg, batch=b, num_iter=self.s.num_iter, cfg_scale=self.spec(kind).cfg,
                             head_calls=self.head_calls(kind), num_buckets=self.s.num_buckets)["total"]
        depth = self.cfg.encoder_depth + self.cfg.decoder_depth
        latency = self.s.num_iter * (depth * 50e-6 + self.head_calls(kind) * 150e-6)
        return fl / self.suite.flop_rate() + latency

    def need_sampler(self, kind: str, b: int, family: str) -> float:
        """Seconds a sampler row needs: compile + warm-up + repeats up to --target-s (at least --min-reps)."""
        call = self.est_sampler_call(kind, b)
        run = max((1 + self.s.min_reps) * call, self.s.target_s + 2 * call)
        return self.suite.est_compile(family) + run + MARGIN_S

    def need_train(self, step: str, remat: bool = True) -> Callable[[int], float]:
        """Seconds a training row at batch b needs: compile + (warm-up + timed) steps at the measured MAR step's
        rate (or the assumed one)."""
        def need(b: int) -> float:
            cfg, s = self.cfg, self.s
            if step == "mar":
                fl, n = F.mar_train_flops(cfg, batch=b)["total"], 2 + 3 * 5
            elif step == "gsim":
                fl, n = F.gsim_step_flops(cfg, batch=b)["total"], 2 + 3 * 3
            else:
                fl = F.rl_step_flops(cfg, batch=b, num_iter=s.rl_num_iter, remat=remat,
                                     num_buckets=s.num_buckets)["total"]
                n = 2 + 3 * 2
            mar = self.suite.find(self.name, "train/mar", s.train_batch)
            rate = 0.8 * mar["tflops_per_s"] * 1e12 if mar and mar.get("tflops_per_s") else self.suite.flop_rate()
            return self.suite.est_compile(step) + n * fl / rate + MARGIN_S
        return need

    # -- samplers ------------------------------------------------------------------------------------------------
    def spec(self, kind: str, cache="none") -> SamplerSpec:
        return bench_spec(self.s, kind, self.cfg_scale, cache)

    def predictor(self, kind: str):
        return bench_predictor(self.s, kind)

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
        entry["compiler_options"] = gpu_compiler_options(b)  # what the library's BatchJit passes at this batch
        counter = iter(range(10 ** 9))
        outs = {}

        def call():
            i = next(counter)
            out = compiled(*args_fn(keys[i % 64]))
            outs["first" if i == 0 else "last"] = out  # the warm-up call draws keys[0]: comparable across samplers
            return out

        with MemoryPoller() as poll:
            t = time_calls(call, min_reps=self.s.min_reps, target_s=self.s.target_s, deadline=self.suite.deadline)
        entry["allocator_sampled"] = poll.result()
        entry["timing"] = t
        entry["time_s"] = t["median_s"]
        entry["per_image_s"] = t["median_s"] / b
        entry["images_per_s"] = b / t["median_s"]
        self._first = outs["first"]
        return outs.get("last", outs["first"])

    def sampler(self, entry: dict, kind: str, b: int) -> None:
        fn = make_sampler(self.graphdef, self.spec(kind), self.predictor(kind), seq_len=self.cfg.seq_len,
                          buffer_size=self.cfg.buffer_size, token_dim=self.cfg.token_dim)
        labels = self.labels(b)
        out = self._time_program(entry, fn, lambda k: (self.state, labels, k), b)
        entry["output_finite_fraction"] = float(jnp.mean(jnp.isfinite(out)))
        self.first_outputs[(f"sample/{kind}", b)] = self._first
        entry["settings"] = self.sampler_settings(kind)
        fl = F.sampler_flops(self.cfg, batch=b, num_iter=self.s.num_iter, cfg_scale=self.spec(kind).cfg,
                             head_calls=self.head_calls(kind), num_buckets=self.s.num_buckets)
        entry["flops_detail"] = fl
        self.suite._mfu(entry, fl["total"], entry["time_s"])

    def kv_sampler(self, entry: dict, kind: str, b: int, variant: str) -> None:
        """kv/<kind>/approx: the approximate KV cache of the bidirectional model, against sample/<kind>;
        kv/<kind>/causal: the uncached sampler with attention="causal"; kv/<kind>/causal_exact: the exact KV cache of
        the causal model, against kv/<kind>/causal. Same weights, labels and keys as the uncached rows (the first
        timed call draws the same key, so the outputs are compared too)."""
        # the policy travels in the SamplerSpec, as sample.kv_cache's does in the sampling programs
        # (sampling/from_config.py), and make_sampler takes it from there
        kw = dict(seq_len=self.cfg.seq_len, buffer_size=self.cfg.buffer_size, token_dim=self.cfg.token_dim)
        predictor = self.predictor(kind)
        policy = {"approx": ("approx",) + tuple(int(x) for x in self.s.kv_approx), "causal": "none",
                  "causal_exact": "exact"}.get(variant)
        if policy is None:
            raise ValueError(f"unknown kv variant {variant!r}")
        spec = self.spec(kind, cache=policy)
        flop_kw = dict(batch=b, num_iter=self.s.num_iter, cfg_scale=spec.cfg, head_calls=self.head_calls(kind),
                       num_buckets=self.s.num_buckets)
        cache = spec.cache.label
        if variant == "approx":
            fn = make_sampler(self.graphdef, spec, predictor, **kw)
            attention, baseline = "bidirectional", f"sample/{kind}"
            fl = F.cached_sampler_flops(self.cfg, policy=policy, **flop_kw)
        elif variant == "causal":
            fn = make_sampler(self.causal_graphdef, spec, predictor, **kw)
            attention, baseline = "causal", f"sample/{kind}"
            fl = F.sampler_flops(self.cfg, **flop_kw)
        else:
            fn = make_sampler(self.causal_graphdef, spec, predictor, **kw)
            attention, baseline = "causal", f"kv/{kind}/causal"
            fl = F.cached_sampler_flops(self.cfg, policy=policy, **flop_kw)
        entry.update(sampler=kind, attention=attention, cache=cache, baseline=baseline)
        labels = self.labels(b)
        out = self._time_program(entry, fn, lambda k: (self.state, labels, k), b)
        entry["output_finite_fraction"] = float(jnp.mean(jnp.isfinite(out)))
        first = self._first
        if variant == "causal":
            self.first_outputs[(entry["name"], b)] = first
        ref = self.first_outputs.get((baseline, b)) if variant != "causal" else None  # causal: another model
        if ref is not None:
            a, r = np.asarray(first, np.float64), np.asarray(ref, np.float64)
            # max |cached - uncached| / max |uncached| on the same key, bf16 (exact: summation order only; approx: the
            # approximation's error, on random weights)
            entry["max_rel_diff_vs_baseline"] = float(np.max(np.abs(a - r)) / max(np.max(np.abs(r)), 1e-30))
        base = self.suite.find(self.name, baseline, b)
        if base is not None:
            entry["baseline_time_s"] = base["time_s"]
            entry["speedup"] = base["time_s"] / entry["time_s"]
        entry["settings"] = dict(self.sampler_settings(kind), policy=cache, attention=attention)
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

        @functools.partial(jax.jit, **jit_options(b))  # the sampler's options at this batch
        def head_loop(state, z, rng):
            model = cast_linear_params(nnx.merge(graphdef, state))  # as the samplers do
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

    # -- one transformer block and its parts -----------------------------------------------------------------------
    def block_shapes(self) -> dict:
        """The block/* rows' shapes: the decoder's width and heads over its positions (buffer + tokens)."""
        cfg = self.cfg
        d, heads = cfg.decoder_embed_dim, cfg.decoder_num_heads
        return dict(batch=self.s.block_batch, seq_len=cfg.buffer_size + cfg.seq_len, dim=d, heads=heads,
                    head_dim=d // heads, mlp_hidden=int(d * cfg.mlp_ratio), calls=self.s.block_calls,
                    dtype=cfg.dtype)

    def block_state(self, impl: str | None = None, kernels: str | None = None):
        """(graphdef, state) of one decoder Block as the model builds it (its module, dtype, dropout rates,
        attention_impl and kernels unless given; no dropout runs, as rng is None), random weights drawn on the host
        like `random_state`'s (the same weights for every impl)."""
        impl = impl or self.cfg.attention_impl
        kernels = kernels or self.cfg.kernels
        if (impl, kernels) not in self._block:
            cfg = self.cfg
            graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Block(
                cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.mlp_ratio, attn_drop=cfg.attn_dropout,
                proj_drop=cfg.proj_dropout, rngs=nnx.Rngs(self.s.seed), dtype=cfg.jnp_dtype, attention_impl=impl,
                kernels=kernels)))
            state = random_init.random_like(abstract, seed=self.s.seed + 21, rule=random_init.param_rule)
            self._block[(impl, kernels)] = graphdef, state
        return self._block[(impl, kernels)]

    def need_block(self, part: str) -> float:
        """Seconds a block/* row needs: compile + warm-up + repeats, the loop's FLOPs at the assumed rate plus ~30 us
        per call of the part."""
        sh = self.block_shapes()
        fl = sh["calls"] * sh["batch"] * F.block_part_flops(part, sh["seq_len"], sh["dim"], self.cfg.mlp_ratio)
        call = fl / self.suite.flop_rate() + sh["calls"] * 30e-6
        run = max((1 + self.s.min_reps) * call, self.s.target_s + 2 * call)
        return self.suite.est_compile("block") + run + MARGIN_S

    def block_part(self, entry: dict, part: str) -> None:
        """block/<part>: the part called `calls` times in one jitted fori_loop, each call's output the next call's
        input (so the launches are amortised and nothing can be hoisted out of the loop), bf16 inputs drawn on the
        host, no mask. The attention cores take q, k, v (B, T, H, hd) and feed their output back as q; the others
        take x (B, T, D). attention and mlp include their residual add, as in Block; matmuls chains qkv (its three
        outputs summed), proj, fc1 and fc2 with nothing in between."""
        sh = self.block_shapes()
        b, t, d, heads, hd, n = sh["batch"], sh["seq_len"], sh["dim"], sh["heads"], sh["head_dim"], sh["calls"]
        dt = self.cfg.jnp_dtype
        impl = None
        if part == "attention_core_dpa":
            impl = "cudnn" if jax.devices()[0].platform == "gpu" else None
            entry["implementation"] = impl or "default (implementation=None)"

        def one(blk, y, *consts):
            if part in ("full", "full_xla"):
                return blk(y)[0]
            if part == "attention":
                return y + blk.attn(blk.norm1(y))[0].astype(y.dtype)
            if part == "mlp":
                return y + blk.mlp(blk.norm2(y)).astype(y.dtype)
            if part == "matmuls":
                a = blk.attn.qkv(y).reshape(b, t, 3, d).sum(axis=2)
                return blk.mlp.fc2(blk.mlp.fc1(blk.attn.proj(a)))
            if part == "attention_core":
                return attention_core(y, *consts)
            if part == "attention_core_dpa":
                return jax.nn.dot_product_attention(y, *consts, scale=hd ** -0.5, implementation=impl)
            raise ValueError(f"unknown block part {part!r}")

        if part.startswith("attention_core"):
            graphdef, params = None, None
            shape = jax.ShapeDtypeStruct((b, t, heads, hd), dt)
            y, *consts = random_init.random_like((shape,) * 3, seed=self.s.seed + 22, rule=random_init.data_rule)
        else:
            xla = part == "full_xla"  # the block as XLA alone computes it: the reference beside `full`
            graphdef, params = self.block_state("xla", "xla") if xla else self.block_state()
            entry["attention_impl"] = "xla" if xla else self.cfg.attention_impl
            entry["kernels"] = "xla" if xla else self.cfg.kernels
            y = random_init.random_like(jax.ShapeDtypeStruct((b, t, d), dt), seed=self.s.seed + 23,
                                        rule=random_init.data_rule)
            consts = []

        def single(params, y, *consts):
            return one(None if params is None else nnx.merge(graphdef, params), y, *consts)

        @functools.partial(jax.jit, **jit_options(b))
        def loop(params, y, *consts):
            blk = None if params is None else cast_linear_params(nnx.merge(graphdef, params))  # as the samplers do
            return jax.lax.fori_loop(0, n, lambda i, z: one(blk, z, *consts), y)

        args = (params, y, *consts)
        out = self._time_program(entry, loop, lambda k: args, b)
        for k in ("per_image_s", "images_per_s"):
            entry.pop(k, None)
        entry["output_finite_fraction"] = float(jnp.mean(jnp.isfinite(out)))
        try:  # XLA's count for one call of the part (the loop's cost analysis counts a loop body once)
            cost = jax.jit(single).lower(*args).cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            entry["xla_flops_per_call"] = float(cost["flops"])
        except Exception as e:  # noqa: BLE001 - not every backend / version implements it
            entry["xla_flops_per_call_error"] = repr(e)[:300]
        if part == "attention_core_dpa":  # one call of each core on the same inputs (the unfused core's own inputs)
            a = np.asarray(jax.jit(single)(*args), np.float64)
            r = np.asarray(jax.jit(attention_core)(y, *consts), np.float64)
            entry["max_rel_diff_vs_attention_core"] = float(np.max(np.abs(a - r)) / max(np.max(np.abs(r)), 1e-30))
        per_call = b * F.block_part_flops(part, t, d, self.cfg.mlp_ratio)
        entry.update(part=part, seq_len=t, calls=n, shapes=sh, flops_per_call=per_call,
                     time_per_call_s=entry["time_s"] / n)
        self.suite._mfu(entry, n * per_call, entry["time_s"])

    # -- training ------------------------------------------------------------------------------------------------
    def _batch(self, b: int) -> dict:
        k1, k2 = jax.random.split(jax.random.key(11))
        return {"tokens": jax.random.normal(k1, (b, self.cfg.seq_len, self.cfg.token_dim), jnp.float32),
                "labels": jax.random.randint(k2, (b,), 0, self.cfg.class_num, jnp.int32)}

    def _train_timing(self, entry: dict, jitted, state, extra_args: tuple, b: int, steps: int) -> None:
        compiled, comp = compile_timed(jitted, state, *extra_args)
        entry["compile"] = comp
        entry["compiler_options"] = gpu_compiler_options(b)
        with MemoryPoller() as poll:
            t, _ = time_steps(lambda st: compiled(st, *extra_args), state, warmup=2 if not self.s.quick else 1,
                              steps=steps, rounds=3 if not self.s.quick else 1, deadline=self.suite.deadline)
        entry["allocator_sampled"] = poll.result()
        entry["timing"] = t
        entry["time_s"] = t["median_s"]
        entry["images_per_s"] = b / t["median_s"]
        entry["finite_loss"] = t["finite_loss"]

    def train_mar(self, entry: dict, b: int, remat_policy: str | None = None) -> None:
        """train/mar at batch b; remat_policy (the remat/mar/* rows): the same step with model.remat_policy set."""
        import optax
        from marval_jax.losses.mar_loss import mar_loss
        from marval_jax.train.optimizer import ema_update, mar_optimizer
        cfg, graphdef = self.cfg, self.graphdef
        if remat_policy is not None:  # the same parameter tree; only the graph's config differs
            cfg = dataclasses.replace(cfg, remat_policy=remat_policy)
            graphdef = nnx.graphdef(nnx.eval_shape(lambda: MAR(cfg, rngs=nnx.Rngs(self.s.seed))))
            entry["remat_policy"] = cfg.remat_mode
            entry["remat_blocks"] = cfg.remat_blocks
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

        self._train_timing(entry, jax.jit(train_step, donate_argnums=0, **jit_options(b)),
                           state, (self._batch(b),), b,
                           steps=5 if not self.s.quick else 2)
        fl = F.mar_train_flops(cfg, batch=b, mask_ratio_min=0.7, diffusion_batch_mul=4)
        entry["flops_detail"] = fl
        entry["settings"] = dict(mask_ratio_min=0.7, diffusion_batch_mul=4, enc_len=enc_len, remat=cfg.remat,
                                 remat_policy=cfg.remat_mode,
                                 dropout=True, optimizer="adamw b2 0.95 wd 0.02 clip 3.0 + EMA", data="fixed batch")
        self.suite._mfu(entry, fl["total"], entry["time_s"])

    def train_gsim(self, entry: dict, b: int) -> None:
        import optax
        from marval_jax.losses.gsim import make_gsim_losses
        from marval_jax.train.optimizer import make_optimizer
        cfg, graphdef = self.cfg, self.graphdef
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

        self._train_timing(entry, jax.jit(step, donate_argnums=0, **jit_options(b)),
                           state, (teacher, self._batch(b)), b,
                           steps=3 if not self.s.quick else 1)
        st = losses.settings
        fl = F.gsim_step_flops(cfg, batch=b, mask_ratio_min=st.mask_ratio_min, guidance=st.guidance_scale != 1.0)
        entry["flops_detail"] = fl
        entry["settings"] = dict(dataclasses.asdict(st), enc_len=losses.enc_len,
                                 step="one generator update + one fake-score update", data="fixed batch")
        self.suite._mfu(entry, fl["total"], entry["time_s"])

    def train_rl(self, entry: dict, b: int, remat: bool = True) -> None:
        """The RL step at batch b with rl.remat on (jax.checkpoint per AR iteration) or off; the model's own
        per-block remat (model.remat) stays as configured (off for MAR-B)."""
        cfg, graphdef = self.cfg, self.graphdef
        step, init_state, loss_fn, rl_cfg = rl_bench_step(cfg, graphdef, num_iter=self.s.rl_num_iter,
                                                          num_buckets=self.s.num_buckets, t_init=self.s.t_init,
                                                          remat=remat)
        state = init_state(copy_tree(self.state))
        self._train_timing(entry, jax.jit(step, donate_argnums=0, **jit_options(b)),
                           state, (self.labels(b),), b,
                           steps=2 if not self.s.quick else 1)
        fl = F.rl_step_flops(cfg, batch=b, num_iter=rl_cfg.num_iter, backprop_steps=-1, remat=remat,
                             num_buckets=self.s.num_buckets)
        entry["flops_detail"] = fl
        entry["settings"] = dict(vars(rl_cfg), num_buckets=self.s.num_buckets, plan_pieces=len(loss_fn.plan.pieces),
                                 t_init=self.s.t_init, model_remat=cfg.remat,
                                 reward="stand-in (reshape decode + closed-form reward); reward model not timed")
        self.suite._mfu(entry, fl["total"], entry["time_s"])

