"""The benchmark suite's runner: `Settings`, and `Suite`, which runs the rows in priority order under a time budget,
guards each measurement (a failure or an out-of-memory error is recorded, never raised; an out-of-memory training
step is retried at half the batch) and rewrites the JSON report after every row. marval_jax/benchmarks/suite.py
describes the rows; `ModelBench` (model_bench.py) measures them; report.py renders the tables."""
from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import gc
import json
import os
import platform
import sys
import time
import traceback
from typing import Any, Callable

import jax
import numpy as np

from marval_jax.benchmarks.defaults import (BLOCK_BATCH, BLOCK_CALLS, GSIM_BATCH, KV_APPROX, KV_VARIANTS,
                                            NUM_BUCKETS, RL_BATCH, REMAT_ROWS, TRAIN_STEPS)
from marval_jax.benchmarks.flops import BLOCK_PARTS
from marval_jax.benchmarks.model_bench import ModelBench, model_config, random_state
from marval_jax.benchmarks.report import _json_default, write_table
from marval_jax.benchmarks.timing import Deadline, device_memory, matmul_tflops

# Dense bf16 peak (datasheet) and the measured bf16 matmul rate on this workplace's H200 (KINDS.md).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0}
MATMUL_REF_TFLOPS = {"H200": 795.0}


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
    num_buckets: int = NUM_BUCKETS
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
    rows: tuple[str, ...] | None = None  # fnmatch patterns of the row names to run (None: every row of `what`)
    plan: bool = False  # list the rows in order with their estimated need, compile and run nothing
    scan_blocks: bool = False  # model.scan_blocks for every row: the blocks as one scanned layer stack
    attention_impl: str | None = None  # model.attention_impl for every row (None: the config's, "auto")
    kernels: str | None = None  # model.kernels for every row (None: the config's, "xla")
    remat_blocks: int = -1  # model.remat_blocks for every row: the first N blocks of each stack under the policy

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


# Compile-time guesses (s) before anything was measured in a run; once a program of the same family compiled, 1.25 x
# the largest measured compile time of that family is used, else the guess scaled by the measured sampler compiles.
# The guesses are that same 1.25 x over MAR-B's largest compile of the family in docs/benchmarks/*.json (H200 and
# H100, 2026-11-29 to 2026-12-07): samplers 38.2 s, KV-cached sampler 134.1, MAR training step at batch 128 89.2
# (a remat row at batch 256 took 138.5: the first row of such a run may overrun by the difference), GSIM step 75.3,
# RL step 191.8, breakdown 43.7 (block rows: ~2 s; 20 kept). An overestimate skips rows that would have fit (three
# calls of 2026-12-07 measured nothing under the older guesses), an underestimate lets a row run into the
# hard limit.
COMPILE_GUESS_S = {"sample": 48.0, "kv": 168.0, "mar": 112.0, "gsim": 94.0, "rl": 240.0, "breakdown": 55.0,
                   "block": 20.0}
ASSUMED_MFU = 0.3          # run-time estimates before a measurement exists: this fraction of the dense peak
CPU_FLOPS = 5e10           # ... or this rate when the peak is unknown (CPU)
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
        self.planned_s = 0.0  # --plan: the estimates of the rows planned so far
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
              (f" temp {temp / 2 ** 30:.2f}GiB" if (temp := ((entry.get("compile") or {}).get("memory") or {})
                                                      .get("temp_size_in_bytes")) is not None else "") +
              (f" MFU {entry['mfu_peak']:.1%}" if entry.get("mfu_peak") else "") +
              (f" x{entry['speedup']:.2f} vs {entry['baseline']}" if entry.get("speedup") else "") +
              (f" need {entry['need_s']:.0f}s" if entry["status"] == "planned" else "") +
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

    def selected(self, name: str) -> bool:
        """Whether row `name` is part of this run (--rows: one of its patterns matches)."""
        return self.s.rows is None or any(fnmatch.fnmatchcase(name, p) for p in self.s.rows)

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
        if not self.selected(name):  # not recorded: a row --rows leaves out is not part of this run
            return {"model": model, "name": name, "batch": batch, "status": "not selected"}
        entry: dict[str, Any] = {"model": model, "name": name, "batch": batch, "need_s": round(need_s, 1)}
        left = self.deadline.remaining() - self.planned_s
        if left < need_s:
            entry["status"] = "skipped"
            entry["reason"] = f"time budget: {left:.0f} s left, {need_s:.0f} s needed"
            return self.record(entry)
        if self.s.plan:  # as if the row took its estimate, so the plan shows what a budget would skip
            self.planned_s += need_s
            entry["status"] = "planned"
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
        if jax.devices()[0].platform == "gpu" and not s.plan:
            try:
                self.report["peaks"]["matmul_measured_tflops"] = matmul_tflops()
                print(f"[{self.deadline.elapsed():7.1f}s] bf16 matmul 8192^3: "
                      f"{self.report['peaks']['matmul_measured_tflops']:.1f} TFLOP/s", flush=True)
            except Exception as e:  # noqa: BLE001
                self.report["peaks"]["matmul_measured_error"] = repr(e)
        self.write()
        for name in s.models:
            given = dict(attention_impl=s.attention_impl, kernels=s.kernels)   # None: the config's own
            cfg = dataclasses.replace(model_config(name), scan_blocks=s.scan_blocks, remat_blocks=s.remat_blocks,
                                      **{k: v for k, v in given.items() if v is not None})
            graphdef, state = (None, None) if s.plan else self.random_model(name, cfg)
            self.report.setdefault("model_configs", {})[name] = dataclasses.asdict(cfg)
            self.run_rows(ModelBench(self, name, cfg, graphdef, state), name)
            del state
        if s.plan:
            self.report["planned_s"] = self.planned_s
            print(f"plan: {self.planned_s:.0f} s estimated for the planned rows", flush=True)
        self.report["total_s"] = self.deadline.elapsed()
        self.write()
        return self.report

    def random_model(self, name: str, cfg) -> tuple[Any, Any]:
        """(graphdef, state) of model `name` with random weights (`random_state`), its time and size reported."""
        t0 = time.perf_counter()
        graphdef, state = random_state(cfg, self.s.seed)
        jax.block_until_ready(state)
        self.report.setdefault("init_s", {})[name] = time.perf_counter() - t0
        nparams = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state))
        print(f"[{self.deadline.elapsed():7.1f}s] {name}: random state, {nparams / 1e6:.1f}M parameters in "
              f"{self.report['init_s'][name]:.1f}s (drawn on the host leaf by leaf, no initialiser compiled)",
              flush=True)
        self.report.setdefault("params", {})[name] = nparams
        return graphdef, state

    def run_rows(self, m: ModelBench, name: str) -> None:
        """Every row of `what` for one model, in priority order."""
        s = self.s
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
        if "remat" in s.what:  # MAR's training step under each remat policy, halving the batch where it runs out
            for policy in REMAT_ROWS:
                self.guarded_halving(name, f"remat/mar/{policy}", s.train_batch,
                                     lambda e, b, p=policy: m.train_mar(e, b, remat_policy=p), m.need_train("mar"),
                                     "mar")

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



def device_slug() -> str:
    kind = jax.devices()[0].device_kind.lower()
    for key in ("h200", "h100", "a100", "l4", "v5", "v6", "v4"):
        if key in kind:
            return key
    return "".join(ch if ch.isalnum() else "_" for ch in kind).strip("_") or "device"


def row_names(what, train_steps=TRAIN_STEPS) -> list[str]:
    """Every row name (model and batch aside) the families `what` and the training steps `train_steps` produce:
    what --rows patterns are matched against."""
    kinds = ("teacher", "onestep")
    families = {
        "sample": [f"sample/{k}" for k in kinds],
        "train": [f"train/{t}" for t in TRAIN_STEPS if t in train_steps],
        "kv": [f"kv/{k}/{v}" for k in kinds for v in KV_VARIANTS],
        "breakdown": [f"breakdown/{k}/{c}" for k in kinds for c in ("transformer_loop", "head_loop")],
        "block": [f"block/{p}" for p in BLOCK_PARTS],
        "remat": [f"remat/mar/{p}" for p in REMAT_ROWS]}
    return [n for f in what for n in families[f]]


def main_run(settings: Settings) -> dict:
    if settings.out is None and not settings.plan:  # a plan overwrites no measured report
        settings.out = os.path.join("docs", "benchmarks", f"{device_slug()}.json")
    report = Suite(settings).run()
    if settings.table:
        write_table(report, settings.table)
    return report
