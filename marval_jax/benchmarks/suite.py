"""The benchmark suite: samplers, training steps and a time breakdown of the samplers, on whatever device JAX finds.

Each measurement becomes one result dict (see `Suite.record`); the JSON file is rewritten after every result, so a
run cut short keeps what it measured. Models use random weights (`random_state`: every parameter N(0, 0.02^2),
LayerNorm scales 1 + N(0, 0.02^2), drawn on the host leaf by leaf, so no initialiser is compiled and no layer is
zero), bfloat16 compute and float32 parameters.

Measurements (per model):
  sample/teacher   MAR's sampler: 64 AR iterations, CFG (2.9 linear for MAR-B) fused into 2B rows, the head's
                   respaced reverse chain (100 steps) with CFG inside, temperature 1.
  sample/onestep   MARVAL's sampler: 64 AR iterations, one head call at t_init = 760 per token, no CFG.
  train/mar        MAR's training step (mar_loss with dropout and label drop, AdamW with the reference decay set,
                   clip 3.0, EMA), batch 256, jitted with the state donated.
  train/gsim       one generator update + one fake-score update (marval_jax.losses.gsim, default settings:
                   teacher CFG 1.2, pseudo-Huber), three MAR states (teacher frozen).
  train/rl         the RL loss (marval_jax.losses.rl) backpropagated through the one-step generator's 64-iteration
                   AR loop (rl.remat on: jax.checkpoint per AR iteration, all iterations carry gradient); the tokenizer
                   decode and the reward model are replaced by a reshape and a closed-form reward, so only the
                   generator is timed.
  train/rl_noremat the same step with rl.remat off (every iteration's activations kept for the backward pass), at the
                   same batch; an out-of-memory failure is recorded as status "oom" and the step is retried at half
                   the batch (down to 1), then train/rl is measured again at the batch that fitted.
  kv/<s>/approx    the KV-cached sampler (marval_jax.sampling.cached_sampler) of the bidirectional model with the
                   approximate policy ("approx", r, R); speed-up against sample/<s> at the same batch.
  kv/<s>/causal    the uncached sampler of the same weights with attention="causal" (the exact cache's reference).
  kv/<s>/causal_exact  the exact KV-cached sampler (attention="causal"); speed-up against kv/<s>/causal.
  breakdown/*      the sampler with the predictor replaced by a slice of z (transformer passes + token gathers and
                   scatters of the AR loop) and the predictor calls alone on fixed conditions (head loop), each one
                   compiled loop over the same segments, so that transformer + head + rest = sampler.
  block/*          (--what block only) one decoder block of the model at --block-batch over the decoder's positions
                   (buffer + tokens, 320 for ImageNet-256), and its parts: full (Block with the model's
                   attention_impl, "auto": cuDNN's fused attention on GPU in bf16), full_xla (the same Block with
                   attention_impl "xla", the reference's unfused attention), attention (norm1 + Attention +
                   residual), attention_core (q k^T in f32, softmax, p v: transformer.attention_core),
                   attention_core_dpa (the same through jax.nn.dot_product_attention, cuDNN on GPU), matmuls (qkv,
                   proj, fc1, fc2 alone), mlp (norm2 + Mlp + residual); each part called --block-calls (24) times in
                   one compiled fori_loop with its output fed back.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
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
from marval_jax.benchmarks import random_init
from marval_jax.benchmarks.defaults import (BLOCK_BATCH, BLOCK_CALLS, GSIM_BATCH, KV_APPROX, KV_VARIANTS, RL_BATCH,
                                            TRAIN_STEPS)
from marval_jax.benchmarks.flops import BLOCK_PARTS
from marval_jax.benchmarks.timing import (Deadline, MemoryPoller, compile_timed, device_memory, matmul_tflops,
                                          time_calls, time_steps)
from marval_jax.models import mar as mar_lib
from marval_jax.models.mar import MAR, MARConfig, train_encoder_len, unpatchify
from marval_jax.models.transformer import Block, attention_core, cast_linear_params
from marval_jax.parallel.compiler_options import gpu_compiler_options, jit_options
from marval_jax.sampling.ar_sampler import SamplerSpec, make_sampler, onestep_predictor, teacher_predictor
from marval_jax.sampling.cached_sampler import make_cached_sampler
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
    gsim_batch: int = GSIM_BATCH
    rl_batch: int = RL_BATCH
    rl_num_iter: int = 64
    train_steps: tuple[str, ...] = TRAIN_STEPS
    kv_batches: list[int] | None = None  # batches of the kv/* rows (default: `batches`)
    kv_approx: tuple[int, int] = KV_APPROX  # (r, R) of the approximate cache policy
    breakdown_batch: int | None = None
    block_batch: int = BLOCK_BATCH  # batch of the block/* rows
    block_calls: int = BLOCK_CALLS  # calls of the part in each block/* row's compiled loop
    time_budget_s: float | None = None
    min_reps: int = 2
    target_s: float = 3.0
    seed: int = 0

    @classmethod
    def quick_settings(cls, **kw) -> "Settings":
        """Tiny shapes for a CPU smoke run (tests): every code path, seconds of compute."""
        base = dict(models=["tiny"], num_iter=2, head_steps="2", num_buckets=1, train_batch=2, gsim_batch=2,
                    rl_batch=2, rl_num_iter=2, block_batch=2, block_calls=2, min_reps=1, target_s=0.0,
                    quick=True)
        base.update(kw)
        base["batches"] = [2]  # one batch size: every code path once
        base["kv_batches"] = [2]
        return cls(**base)


def model_config(name: str) -> MARConfig:
    common = dict(mlp_ratio=4.0, attn_dropout=0.1, proj_dropout=0.1, label_drop_prob=0.1, dtype="bfloat16")
    if name == "tiny":
        return MARConfig(**common, **TINY, remat=False)
    if name not in SIZES:
        raise ValueError(f"--models takes base, large, huge (or tiny), got {name!r}")
    return MARConfig(**common, **IMAGENET, **SIZES[name], remat=REMAT[name])


def random_state(cfg: MARConfig, seed: int = 0):
    """(graphdef, state) of a MAR with random weights: the shapes from `nnx.eval_shape` (nothing runs), every
    parameter drawn on the host (`random_init.param_rule`: N(0, 0.02^2), LayerNorm scales 1 + N(0, 0.02^2)) and
    copied to the default device leaf by leaf. No initialiser is compiled: jitting MAR's own init as one program
    did not finish compiling for MAR-B within the H200 call's 435 s (2026-11-29)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MAR(cfg, rngs=nnx.Rngs(seed))))
    return graphdef, random_init.random_like(abstract, seed=seed + 1, rule=random_init.param_rule)


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


# Compile-time guesses (s, one H200) before anything was measured; once a program of the same family compiled, 1.25 x
# the largest measured compile time of that family is used, else the guess scaled by the measured sampler compiles.
COMPILE_GUESS_S = {"sample": 60.0, "kv": 90.0, "mar": 90.0, "gsim": 180.0, "rl": 150.0, "breakdown": 45.0,
                   "block": 20.0}
ASSUMED_MFU = 0.3          # run-time estimates before a measurement exists: this fraction of the dense peak
CPU_FLOPS = 5e10           # ... or this rate when the peak is unknown (CPU)
MARGIN_S = 10.0            # added to every estimate (tracing, transfers)
PREDICT_SLACK = 1.05       # a halved batch is skipped as out of memory only if its scaled need exceeds the limit by 5%


def is_oom(e: BaseException) -> bool:
    """An allocation failure of the device (XLA's RESOURCE_EXHAUSTED / 'Out of memory ...')."""
    msg = f"{type(e).__name__}: {e}"
    return "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()


class Suite:
    def __init__(self, settings: Settings):
        self.s = settings
        self.deadline = Deadline(settings.time_budget_s)
        kind = jax.devices()[0].device_kind
        self.peak = _lookup(PEAK_TFLOPS, kind)
        self.matmul_ref = _lookup(MATMUL_REF_TFLOPS, kind)
        self.compiles: dict[str, list[float]] = {}
        self.report: dict[str, Any] = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": _device_info(), "versions": _versions(), "argv": sys.argv,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "settings": dataclasses.asdict(settings),
            "peaks": {"bf16_dense_peak_tflops": self.peak, "matmul_reference_tflops": self.matmul_ref},
            "results": [],
        }

    # -- bookkeeping -----------------------------------------------------------------------------------------------
    def write(self) -> None:
        """Rewrites the JSON (and the table, if asked for) so that a run cut short keeps what it measured."""
        if self.s.out:
            os.makedirs(os.path.dirname(os.path.abspath(self.s.out)), exist_ok=True)
            tmp = self.s.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.report, f, indent=1, default=_json_default)
            os.replace(tmp, self.s.out)
        if self.s.table:
            try:
                write_table(self.report, self.s.table)
            except Exception as e:  # noqa: BLE001 - the table is re-rendered at the end; never lose the JSON for it
                print(f"table not written: {e!r}", file=sys.stderr, flush=True)

    def record(self, entry: dict) -> dict:
        entry["device_memory_after"] = device_memory()
        before = entry.get("device_memory_before") or {}
        after = entry["device_memory_after"] or {}
        if "peak_bytes_in_use" in after:
            # the allocator's peak is a running peak of the process: it is this measurement's own peak when it rose
            # during the measurement, else an upper bound of it
            entry["allocator_peak_bytes"] = after["peak_bytes_in_use"]
            entry["allocator_peak_is_own"] = after["peak_bytes_in_use"] > before.get("peak_bytes_in_use", -1)
        entry["elapsed_s"] = round(self.deadline.elapsed(), 2)
        self.report["results"].append(entry)
        self.write()
        t = entry.get("time_s")
        print(f"[{entry['elapsed_s']:7.1f}s] {entry['model']:5s} {entry['name']:34s} b={entry.get('batch')!s:4s} "
              f"{entry['status']:8s} " + (f"time {t:.4g}s" if t is not None else "") +
              (f" compile {entry['compile']['total_s']:.1f}s" if entry.get("compile") else "") +
              (f" MFU {entry['mfu_peak']:.1%}" if entry.get("mfu_peak") else "") +
              (f" x{entry['speedup']:.2f} vs {entry['baseline']}" if entry.get("speedup") else "") +
              (f" ({entry.get('reason') or entry.get('error', '')[:300]})" if entry["status"] != "ok" else ""),
              flush=True)
        return entry

    def _mfu(self, entry: dict, flops: float, seconds: float) -> None:
        entry["flops"] = flops
        entry["tflops_per_s"] = flops / seconds / 1e12
        entry["mfu_peak"] = flops / seconds / (self.peak * 1e12) if self.peak else None
        entry["mfu_matmul_ref"] = flops / seconds / (self.matmul_ref * 1e12) if self.matmul_ref else None

    # -- time estimates (what --time-budget compares against) -------------------------------------------------------
    def flop_rate(self) -> float:
        return ASSUMED_MFU * self.peak * 1e12 if self.peak else CPU_FLOPS

    def est_compile(self, family: str) -> float:
        seen = self.compiles.get(family)
        if seen:
            return 1.25 * max(seen)
        ref = self.compiles.get("sample")
        if ref:
            return 1.25 * max(ref) * COMPILE_GUESS_S[family] / COMPILE_GUESS_S["sample"]
        return COMPILE_GUESS_S[family]

    def find(self, model: str, name: str, batch: int | None, status: str = "ok") -> dict | None:
        for e in reversed(self.report["results"]):
            if e["model"] == model and e["name"] == name and e.get("batch") == batch and e["status"] == status:
                return e
        return None

    # -- guarded measurements --------------------------------------------------------------------------------------
    def guarded(self, model: str, name: str, batch: int | None, fn: Callable[[dict], None],
                need_s: float = 30.0, family: str | None = None) -> dict:
        """Runs fn(entry) unless the time left is below need_s (status "skipped"); a failure is recorded, never
        raised: status "oom" for an out-of-memory error (with the allocator's message), "error" otherwise."""
        entry: dict[str, Any] = {"model": model, "name": name, "batch": batch, "need_s": round(need_s, 1)}
        if self.deadline.remaining() < need_s:
            entry["status"] = "skipped"
            entry["reason"] = f"time budget: {self.deadline.remaining():.0f} s left, {need_s:.0f} s needed"
            return self.record(entry)
        entry["device_memory_before"] = device_memory()
        t0 = time.perf_counter()
        try:
            fn(entry)
            entry["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - one failed measurement must not lose the others
            msg = f"{type(e).__name__}: {e}"
            entry["status"] = "oom" if is_oom(e) else "error"
            entry["error"] = msg[:4000]
            entry["traceback"] = traceback.format_exc()[-4000:]
            del e
        entry["wall_s"] = round(time.perf_counter() - t0, 2)
        comp = (entry.get("compile") or {}).get("total_s")
        if family is not None and comp is not None:
            self.compiles.setdefault(family, []).append(comp)
        if entry["status"] != "ok":
            gc.collect()  # the failed attempt's arrays (kept alive by its frames) before the next measurement
        return self.record(entry)

    def memory_limit(self) -> int | None:
        """The device allocator's limit in bytes (None where the backend does not report it, e.g. CPU)."""
        return (device_memory() or {}).get("bytes_limit")

    def predicted_oom(self, failed: dict, b: int) -> str | None:
        """Why batch b cannot fit either, judged from an attempt that ran out of memory: its buffer assignment
        (arguments + temporaries per example) scaled to b against the allocator's limit, with 5% of slack for the
        estimate; None if b might fit, the limit is unknown, or b == 1 (always tried)."""
        mem = (failed.get("compile") or {}).get("memory") or {}
        limit = self.memory_limit()
        if b <= 1 or not limit or not mem.get("program_peak_bytes"):
            return None
        args, peak, fb = mem["argument_size_in_bytes"], mem["program_peak_bytes"], failed["batch"]
        need = args + (peak - args) * b / fb
        if need <= PREDICT_SLACK * limit:
            return None
        return (f"predicted out of memory, not compiled: the buffer assignment at batch {fb} ({peak / 2 ** 30:.1f} "
                f"GiB) scaled to batch {b} needs {need / 2 ** 30:.1f} GiB > {PREDICT_SLACK:g} x the allocator's limit "
                f"{limit / 2 ** 30:.1f} GiB")

    def guarded_halving(self, model: str, name: str, batch: int, fn: Callable[[dict, int], None],
                        need_s: Callable[[int], float], family: str | None = None) -> dict:
        """`guarded` at `batch`; after an out-of-memory failure the same measurement again at half the batch, down to
        1, so that a number results. A halved batch that the failed attempt's buffer assignment shows cannot fit
        either is recorded as "oom" (predicted) without compiling it, to save the compile time. Every attempt is
        recorded; returns the last entry."""
        b = batch
        while True:
            entry = self.guarded(model, name, b, lambda e, b=b: fn(e, b), need_s(b), family)
            if entry["status"] != "oom" or b <= 1:
                return entry
            failed = entry
            b //= 2
            while (why := self.predicted_oom(failed, b)) is not None:
                self.record({"model": model, "name": name, "batch": b, "status": "oom", "predicted": True,
                             "error": why})
                b //= 2
            print(f"           {name}: out of memory at batch {failed['batch']}, retrying at batch {b}", flush=True)

    # -- measurements ----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        s = self.s
        if jax.devices()[0].platform == "gpu":
            try:
                self.report["peaks"]["matmul_measured_tflops"] = matmul_tflops()
                print(f"[{self.deadline.elapsed():7.1f}s] bf16 matmul 8192^3: "
                      f"{self.report['peaks']['matmul_measured_tflops']:.1f} TFLOP/s", flush=True)
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
            print(f"[{self.deadline.elapsed():7.1f}s] {name}: random state, {nparams / 1e6:.1f}M parameters in "
                  f"{self.report['init_s'][name]:.1f}s (drawn on the host leaf by leaf, no initialiser compiled)",
                  flush=True)
            self.report.setdefault("params", {})[name] = nparams
            self.report.setdefault("model_configs", {})[name] = dataclasses.asdict(cfg)
            m = ModelBench(self, name, cfg, graphdef, state)
            # Priority order (a time budget skips what does not fit, so the first rows are the likeliest to run):
            # the Speed issue's targets (both samplers at every batch, largest first, with their compile times; MAR
            # training; GSIM with its MFU), then the RL step with and without remat, then the KV-cache rows (largest
            # batch first), then the breakdown.
            batches = sorted(s.batches, reverse=True)
            if "sample" in s.what:
                for b in batches:
                    for kind in ("teacher", "onestep"):
                        self.guarded(name, f"sample/{kind}", b, lambda e, k=kind, b=b: m.sampler(e, k, b),
                                     m.need_sampler(kind, b, "sample"), "sample")
            if "train" in s.what:
                if "mar" in s.train_steps:
                    self.guarded_halving(name, "train/mar", s.train_batch, m.train_mar, m.need_train("mar"), "mar")
                if "gsim" in s.train_steps:
                    self.guarded_halving(name, "train/gsim", s.gsim_batch, m.train_gsim, m.need_train("gsim"),
                                         "gsim")
                self.run_rl(m, name)
            if "kv" in s.what:
                for b in sorted(s.kv_batches or s.batches, reverse=True):
                    for kind in ("onestep", "teacher"):
                        for variant in KV_VARIANTS:
                            fam = "sample" if variant == "causal" else "kv"
                            self.guarded(name, f"kv/{kind}/{variant}", b,
                                         lambda e, k=kind, b=b, v=variant: m.kv_sampler(e, k, b, v),
                                         m.need_sampler(kind, b, fam), fam)
            if "breakdown" in s.what:
                bb = s.breakdown_batch or max(s.batches)
                for kind in ("teacher", "onestep"):
                    need = m.need_sampler(kind, bb, "breakdown")
                    self.guarded(name, f"breakdown/{kind}/transformer_loop", bb,
                                 lambda e, k=kind: m.transformer_loop(e, k, bb), need, "breakdown")
                    self.guarded(name, f"breakdown/{kind}/head_loop", bb, lambda e, k=kind: m.head_loop(e, k, bb),
                                 need, "breakdown")
            if "block" in s.what:
                for part in BLOCK_PARTS:
                    self.guarded(name, f"block/{part}", s.block_batch, lambda e, p=part: m.block_part(e, p),
                                 m.need_block(part), "block")
            del m, state
        self.report["total_s"] = self.deadline.elapsed()
        self.write()
        return self.report

    def run_rl(self, m: "ModelBench", name: str) -> None:
        """train/rl (remat on) at --rl-batch, then train/rl_noremat at the same batch, halving it after an
        out-of-memory failure; if remat off only fitted a smaller batch, train/rl again at that batch (a like-for-like
        pair)."""
        s = self.s
        on = off = None
        if "rl" in s.train_steps:
            on = self.guarded_halving(name, "train/rl", s.rl_batch, lambda e, b: m.train_rl(e, b, remat=True),
                                      m.need_train("rl", remat=True), "rl")
        if "rl_noremat" in s.train_steps:
            off = self.guarded_halving(name, "train/rl_noremat", s.rl_batch,
                                       lambda e, b: m.train_rl(e, b, remat=False),
                                       m.need_train("rl", remat=False), "rl")
        if on is not None and off is not None and off["status"] == "ok" and off["batch"] != on["batch"] \
                and self.find(name, "train/rl", off["batch"]) is None:
            self.guarded_halving(name, "train/rl", off["batch"], lambda e, b: m.train_rl(e, b, remat=True),
                                 m.need_train("rl", remat=True), "rl")


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
        self.first_outputs: dict[tuple[str, int], jax.Array] = {}  # sampler outputs of the first key, to compare
        self._causal_graphdef = None
        self._block = {}  # attention_impl -> (graphdef, state) of the block/* rows' Block

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
        kw = dict(seq_len=self.cfg.seq_len, buffer_size=self.cfg.buffer_size, token_dim=self.cfg.token_dim)
        spec, predictor = self.spec(kind), self.predictor(kind)
        flop_kw = dict(batch=b, num_iter=self.s.num_iter, cfg_scale=spec.cfg, head_calls=self.head_calls(kind),
                       num_buckets=self.s.num_buckets)
        if variant == "approx":
            policy = ("approx",) + tuple(int(x) for x in self.s.kv_approx)
            fn = make_cached_sampler(self.graphdef, spec, predictor, policy=policy, **kw)
            attention, cache, baseline = "bidirectional", "approx r={} R={}".format(*policy[1:]), f"sample/{kind}"
            fl = F.cached_sampler_flops(self.cfg, policy=policy, **flop_kw)
        elif variant == "causal":
            fn = make_sampler(self.causal_graphdef, spec, predictor, **kw)
            attention, cache, baseline = "causal", "none", f"sample/{kind}"
            fl = F.sampler_flops(self.cfg, **flop_kw)
        elif variant == "causal_exact":
            fn = make_cached_sampler(self.causal_graphdef, spec, predictor, policy="exact", **kw)
            attention, cache, baseline = "causal", "exact", f"kv/{kind}/causal"
            fl = F.cached_sampler_flops(self.cfg, policy="exact", **flop_kw)
        else:
            raise ValueError(f"unknown kv variant {variant!r}")
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

    def block_state(self, impl: str | None = None):
        """(graphdef, state) of one decoder Block as the model builds it (its module, dtype, dropout rates and
        attention_impl unless `impl` is given; no dropout runs, as rng is None), random weights drawn on the host like
        `random_state`'s (the same weights for every impl)."""
        impl = impl or self.cfg.attention_impl
        if impl not in self._block:
            cfg = self.cfg
            graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Block(
                cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.mlp_ratio, attn_drop=cfg.attn_dropout,
                proj_drop=cfg.proj_dropout, rngs=nnx.Rngs(self.s.seed), dtype=cfg.jnp_dtype, attention_impl=impl)))
            state = random_init.random_like(abstract, seed=self.s.seed + 21, rule=random_init.param_rule)
            self._block[impl] = graphdef, state
        return self._block[impl]

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
            graphdef, params = self.block_state("xla" if part == "full_xla" else None)
            entry["attention_impl"] = "xla" if part == "full_xla" else self.cfg.attention_impl
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

    def train_mar(self, entry: dict, b: int) -> None:
        import optax
        from marval_jax.losses.mar_loss import mar_loss
        from marval_jax.train.optimizer import ema_update, mar_optimizer
        cfg, graphdef = self.cfg, self.graphdef
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
        import optax
        from marval_jax.losses.rl import make_rl_loss
        from marval_jax.train.optimizer import make_optimizer
        cfg, graphdef = self.cfg, self.graphdef
        rl_cfg = SimpleNamespace(num_iter=self.s.rl_num_iter, backprop_steps=-1, remat=remat, reward_scale=1.0,
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

        self._train_timing(entry, jax.jit(step, donate_argnums=0, **jit_options(b)),
                           state, (self.labels(b),), b,
                           steps=2 if not self.s.quick else 1)
        fl = F.rl_step_flops(cfg, batch=b, num_iter=rl_cfg.num_iter, backprop_steps=-1, remat=remat,
                             num_buckets=self.s.num_buckets)
        entry["flops_detail"] = fl
        entry["settings"] = dict(vars(rl_cfg), t_init=self.s.t_init, model_remat=cfg.remat,
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


def _alloc_gib(entry) -> str:
    """The row's own allocator peak: the largest bytes_in_use sampled while its compiled program ran, else the
    process's running peak if the row raised it, else that running peak as an upper bound (<=)."""
    sampled = (entry.get("allocator_sampled") or {}).get("max_bytes_in_use")
    b = entry.get("allocator_peak_bytes")
    if sampled is not None:
        return f"{sampled / 2 ** 30:.2f}"
    if b is None:
        return "-"
    return ("" if entry.get("allocator_peak_is_own") else "<= ") + f"{b / 2 ** 30:.2f}"


def _same_run_row(report: dict, entry: dict, name: str) -> dict | None:
    """The measured row `name` at `entry`'s model and batch to compare `entry` with: of the same run where the report
    merges several (also a row a later run superseded), else the report's current one."""
    rows = [x for x in report["results"] + report.get("superseded", [])
            if x["model"] == entry["model"] and x["name"] == name and x.get("batch") == entry.get("batch")
            and x.get("status") == "ok" and x.get("time_s")]
    same = [x for x in rows if x.get("run_date") and x.get("run_date") == entry.get("run_date")]
    return (same or rows or [None])[0]


def _status(entry, ok: str) -> str:
    if entry["status"] == "ok":
        when = entry.get("run_date")
        return (ok or "ok") + (f" (run {when[:16].replace('T', ' ')})" if when else "")
    if entry["status"] == "oom":
        return "oom (" + _short_oom(entry.get("error", "")) + ")"
    return entry["status"]


def _short_oom(msg: str) -> str:
    """The allocator's sentence ('Out of memory while trying to allocate N bytes') out of XLA's long message."""
    low = msg.lower()
    i = low.find("out of memory")
    text = msg[i:] if i >= 0 else msg
    return " ".join(text.split())[:120].replace("|", "/")


def _short_error(entry) -> str:
    """An error row's message, first line, shortened for a table cell."""
    msg = (entry.get("error") or "").strip().splitlines()
    return " ".join((msg[0] if msg else "").split())[:120].replace("|", "/")


TRAIN_LABELS = {"train/rl": "rl, remat on", "train/rl_noremat": "rl, remat off"}


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
                         f"{_status(e, ok)} |")
        lines.append("")

    train = [e for e in res if e["name"].startswith("train/")]
    if train:
        lines += ["### Training steps", "",
                  "| model | step | batch | s / step | images / s | compile s | program GiB | allocator peak GiB | "
                  "TFLOP / step | MFU (peak) | MFU (matmul) | target | PyTorch H200 | status |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in train:
            tgt, ok = _target(e)
            lines.append(f"| {e['model']} | {TRAIN_LABELS.get(e['name'], e['name'][6:])} | {e.get('batch')} | "
                         f"{_fmt(e.get('time_s'), '.3f')} | {_fmt(e.get('images_per_s'), '.0f')} | "
                         f"{_fmt((e.get('compile') or {}).get('total_s'), '.1f')} | {_gib(e)} | {_alloc_gib(e)} | "
                         f"{_fmt((e.get('flops') or 0) / 1e12 if e.get('flops') else None, '.1f')} | "
                         f"{_fmt(e.get('mfu_peak'), '.1%')} | {_fmt(e.get('mfu_matmul_ref'), '.1%')} | {tgt} | "
                         f"{PYTORCH_REF.get((e['model'], e['name'], e.get('batch')), '')} | {_status(e, ok)} |")
        missing = {f"train/{n}" for n in TRAIN_STEPS} - {e["name"] for e in train}
        for name in sorted(missing):
            lines.append(f"| - | {TRAIN_LABELS.get(name, name[6:])} | - | - | - | - | - | - | - | - | - | - | - | "
                         "not yet measured |")
        lines += ["", "Program GiB: XLA's buffer assignment of the compiled step (also for an out-of-memory attempt: "
                  "what it would have needed). Allocator peak: the device allocator's bytes in use at their highest "
                  "during the row's timed steps (sampled every 2 ms; model weights and other live arrays of the "
                  "process included), or its `peak_bytes_in_use` when the row raised that running peak; `<=` marks "
                  "the running peak as an upper bound where neither applies.", ""]

    kv = [e for e in res if e["name"].startswith("kv/")]
    if kv:
        lines += ["### KV cache", "",
                  "Same weights, labels and keys as the uncached rows. `approx`: the bidirectional model with the "
                  "approximate cache policy, against the uncached sampler (`sample/*`); `causal` / `causal exact`: "
                  "the model with attention=\"causal\", uncached and with the exact cache; the exact row's "
                  "speed-up is against the uncached causal row. Max rel. diff: max |output - baseline output| / "
                  "max |baseline output| on the same key (random weights, bf16).", "",
                  "| model | sampler | attention | cache | batch | s / batch | s / image | compile s | memory GiB "
                  "| TFLOP | MFU (peak) | baseline | baseline s | speed-up | max rel. diff | status |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in kv:
            _, kind, variant = e["name"].split("/")
            base_name = e.get("baseline") or (f"kv/{kind}/causal" if variant == "causal_exact" else f"sample/{kind}")
            base = _same_run_row(report, e, base_name)
            speed = base["time_s"] / e["time_s"] if base and e.get("time_s") else None
            attention = e.get("attention") or ("bidirectional" if variant == "approx" else "causal")
            cache = e.get("cache") or {"approx": "approx", "causal": "none", "causal_exact": "exact"}[variant]
            lines.append(f"| {e['model']} | {kind} | {attention} | {cache} | {e.get('batch')} | "
                         f"{_fmt(e.get('time_s'), '.3f')} | {_fmt(e.get('per_image_s'), '.4f')} | "
                         f"{_fmt((e.get('compile') or {}).get('total_s'), '.1f')} | {_gib(e)} | "
                         f"{_fmt((e.get('flops') or 0) / 1e12 if e.get('flops') else None, '.1f')} | "
                         f"{_fmt(e.get('mfu_peak'), '.1%')} | {base_name} | "
                         f"{_fmt(base['time_s'] if base else None, '.3f')} | {_fmt(speed, '.2f', 'x')} | "
                         f"{_fmt(e.get('max_rel_diff_vs_baseline'), '.2e')} | {_status(e, '')} |")
        lines.append("")

    brk = [e for e in res if e["name"].startswith("breakdown/")]
    if brk:
        lines += ["### Where the sampler time goes", "",
                  "| model | sampler | batch | component | time s | share of sampler | TFLOP | TFLOP/s | MFU (peak) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for e in brk:
            _, kind, comp = e["name"].split("/")
            full = _same_run_row(report, e, f"sample/{kind}")
            share = e["time_s"] / full["time_s"] if full and e.get("time_s") else None
            lines.append(f"| {e['model']} | {kind} | {e.get('batch')} | {comp.replace('_', ' ')} | "
                         f"{_fmt(e.get('time_s'), '.3f')} | {_fmt(share, '.0%')} | "
                         f"{_fmt((e.get('flops') or 0) / 1e12 if e.get('flops') else None, '.1f')} | "
                         f"{_fmt(e.get('tflops_per_s'), '.0f')} | {_fmt(e.get('mfu_peak'), '.1%')} |")
        for e in samp:
            parts = [x for x in brk if x["model"] == e["model"] and x.get("batch") == e.get("batch")
                     and x["name"].split("/")[1] == e["name"][7:] and x.get("time_s")]
            if len(parts) != 2:
                continue
            e = _same_run_row(report, parts[0], e["name"])  # the sampler row of the breakdown's own run
            if e:
                rest = e["time_s"] - sum(x["time_s"] for x in parts)
                lines.append(f"| {e['model']} | {e['name'][7:]} | {e.get('batch')} | rest (sampler - both) | "
                             f"{rest:.3f} | {rest / e['time_s']:.0%} | | | |")
        lines.append("")

    blk = [e for e in res if e["name"].startswith("block/")]
    if blk:
        lines += ["### Where a transformer block's time goes", "",
                  "One decoder block of the model at the row's batch over T positions (buffer + tokens), each part "
                  "called `calls` times in one compiled loop with its output fed back; ms / block call = time / "
                  "calls. `full` is the block as the model runs it (its attention_impl; \"auto\": cuDNN's fused "
                  "attention on a GPU in bf16), `full xla` the same block with the unfused XLA attention. "
                  "`attention` (the model's attention_impl) and `mlp` include their LayerNorm and residual add; "
                  "`matmuls` is the four "
                  "Linear layers alone (qkv, proj, fc1, fc2); `attention core` is q·kᵀ in f32, softmax in f32 and "
                  "p·v in bf16, unfused, as the model runs it; `attention core dpa` the same through "
                  "`jax.nn.dot_product_attention` (cuDNN's fused kernel on GPU), its max rel. diff against the "
                  "unfused core's output on the same inputs. Rest = full xla - matmuls - attention core: LayerNorms, "
                  "GELU, residual adds and layout changes.", "",
                  "| model | part | batch | T | calls | ms / block call | share of full block | TFLOP/s | MFU (peak) "
                  "| max rel. diff | status |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        groups: list[tuple[str, Any]] = []
        for e in blk:
            if (e["model"], e.get("batch")) not in groups:
                groups.append((e["model"], e.get("batch")))

        def ms(e):
            return None if e is None or e.get("time_per_call_s") is None else 1e3 * e["time_per_call_s"]

        for model, batch in groups:
            rows = [e for e in blk if e["model"] == model and e.get("batch") == batch]
            by: dict[str, dict] = {}
            for e in rows:  # a measured row wins over a skipped or failed one of the same part
                part = e["name"][len("block/"):]
                if part not in by or e["status"] == "ok" or by[part]["status"] != "ok":
                    by[part] = e
            t_len = next((e["seq_len"] for e in rows if e.get("seq_len")), None)
            full = ms(by.get("full")) if (by.get("full") or {}).get("status") == "ok" else None
            for part in BLOCK_PARTS:
                e = by.get(part)
                label = part.replace("_", " ")
                if e is None:
                    lines.append(f"| {model} | {label} | {batch} | {_fmt(t_len, 'd')} | - | - | - | - | - | - | "
                                 "not yet measured |")
                    continue
                t = ms(e) if e["status"] == "ok" else None
                share = t / full if t is not None and full else None
                lines.append(f"| {model} | {label} | {batch} | {_fmt(e.get('seq_len') or t_len, 'd')} | "
                             f"{_fmt(e.get('calls'), 'd')} | {_fmt(t, '.3f')} | {_fmt(share, '.0%')} | "
                             f"{_fmt(e.get('tflops_per_s'), '.0f')} | {_fmt(e.get('mfu_peak'), '.1%')} | "
                             f"{_fmt(e.get('max_rel_diff_vs_attention_core'), '.2e')} | "
                             f"{_status(e, '') if e['status'] != 'error' else 'error: ' + _short_error(e)} |")
            parts = [ms(by[p]) if (by.get(p) or {}).get("status") == "ok" else None
                     for p in ("full_xla", "matmuls", "attention_core")]
            if None not in parts:
                rest = parts[0] - parts[1] - parts[2]
                lines.append(f"| {model} | rest (full xla - matmuls - attention core) | {batch} | {_fmt(t_len, 'd')} | "
                             f"| {rest:.3f} | {rest / parts[0]:.0%} | | | | |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def merge_reports(reports: list[dict], newest_wins: bool = False) -> dict:
    """Several runs' reports as one (e.g. two calls of the suite on the same device): the first run's header, every
    run's rows in order, a row measured (status ok) in a later run replacing, in its place, a skipped or failed one of
    the same model, name and batch (with `newest_wins`, any earlier row of that key: the later run measured newer
    code); wall time summed. Each row keeps the date of its run as `run_date` (shown in the tables' status column)."""
    if len(reports) == 1:
        return reports[0]
    out = dict(reports[0])
    rows: list[dict] = []
    superseded: list[dict] = list(reports[0].get("superseded", []))
    for rep in reports:
        for r in rep["results"]:
            r = dict(r, run_date=r.get("run_date") or rep.get("date"), run_xla_flags=r.get(
                "run_xla_flags", rep.get("xla_flags")))
            key = (r["model"], r["name"], r.get("batch"))
            same = [i for i, x in enumerate(rows) if (x["model"], x["name"], x.get("batch")) == key]
            if same and r["status"] == "ok" and (newest_wins or all(rows[i]["status"] in ("skipped", "error")
                                                                    for i in same)):
                superseded += [rows[i] for i in same if rows[i]["status"] == "ok"]
                rows[same[0]] = r
                for i in reversed(same[1:]):
                    del rows[i]
                continue
            if same and r["status"] == "skipped":
                continue
            rows.append(r)
    out["results"] = rows
    out["superseded"] = superseded  # measured rows a later run replaced (--newest-wins): the runs' own baselines
    out["total_s"] = sum(rep.get("total_s") or 0.0 for rep in reports)
    out["merged_from"] = [rep.get("date") for rep in reports]
    out["peaks"] = dict(reports[0].get("peaks") or {})
    for rep in reports[1:]:
        for k, v in (rep.get("peaks") or {}).items():
            if out["peaks"].get(k) is None:
                out["peaks"][k] = v
    return out


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
