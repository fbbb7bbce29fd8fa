"""The command line of `python -m marval_jax.tools.scale_check` (see the package docstring)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from typing import Any
from marval_jax.user_errors import add_verbose_flag

from marval_jax.tools.scale_check.cases import HBM_DEFAULT, STEPS, case_key, parse_hbm, parse_list, parse_mesh
from marval_jax.tools.scale_check.measurement import (
    _command_key, _execute_main, _save_cache, _spawn, _worker_main, measured_key,)
from marval_jax.tools.scale_check.report import render


def main(argv=None) -> int:
    p = _parser()
    argv = list(argv if argv is not None else sys.argv[1:])
    args = p.parse_args(argv)
    args.argv = argv
    if args.target == "tpu":
        from marval_jax.tools.scale_check import tpu  # libtpu is looked for only here
        return tpu.main(args, argv)
    if args._worker:
        return _worker_main(args)
    if args.execute:
        return _execute_main(args)

    hbm = parse_hbm(args.hbm)
    cache_path = args.cache or (os.path.splitext(args.out)[0] + ".json" if args.out else "")
    cache: dict[str, Any] = {}
    if cache_path and os.path.exists(cache_path):
        with open(cache_path) as f:
            cache = json.load(f)
    registry = cache.setdefault("_commands", {})
    compiled_now: list[str] = []
    if args.record:
        with open(args.record) as f:
            m = json.load(f)
        if args.note:
            m["note"] = args.note
        cache.setdefault("_measured", {})[measured_key(m)] = m
        _save_cache(cache_path, cache)
    else:
        compiled_now = _compile_cases(args, argv, cache, cache_path, registry)
    _write_report(args, cache, registry, hbm)
    return 1 if any("error" in cache[k] for k in compiled_now) else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=sys.modules["marval_jax.tools.scale_check"].__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_verbose_flag(p)
    p.add_argument("--target", default="cpu", choices=("cpu", "gpu", "tpu"),
                   help="cpu: forced host devices (default); gpu: the same, with --execute / --device_probes for the "
                        "device-compiled prediction; tpu: the TPU compiler ahead of time for --topology (needs the "
                        "tpu-aot extra: pip install '.[tpu-aot]'; see scale_check/tpu.py)")
    p.add_argument("--topology", default="v5e:2x2", help="--target=tpu: slice shapes, e.g. v5e:16x16,v5p:4x4x4")
    p.add_argument("--batch", type=int, default=1, help="--target=tpu: the per-chip batch each case is compiled at")
    p.add_argument("--bisect", type=int, default=0, help="--target=tpu: find the largest per-chip batch <= this that "
                                                         "fits the chip's HBM by compiling (0: no, one --batch)")
    p.add_argument("--json", default="", help="--target=tpu: the JSON every finished case is appended to "
                                              "(e.g. docs/scale_tpu.json)")
    p.add_argument("--devices", default="64", help="comma-separated simulated device counts, e.g. 64,256")
    p.add_argument("--models", default="base,large,huge", help="config variants")
    p.add_argument("--steps", default="mar,gsim,rl", help=f"any of {','.join(STEPS)}")
    p.add_argument("--mesh", default="config", help="'config' (each config's mesh) or data=D,fsdp=F,tensor=T")
    p.add_argument("--batches", default="1,2", help="per-device batch sizes compiled per case (two for the fit)")
    p.add_argument("--rl_remat", default="on,off", help="rl.remat values for the RL step")
    p.add_argument("--rl_num_iter", type=int, default=64, help="K, AR iterations of the RL trajectory")
    p.add_argument("--hbm", default=HBM_DEFAULT, help="name=GB,... HBM per device")
    p.add_argument("--hbm_fraction", type=float, default=0.9, help="usable fraction of HBM in the batch fit")
    p.add_argument("--cache", default="", help="JSON of case results (reused; default: --out with .json)")
    p.add_argument("--out", default="", help="markdown report (e.g. docs/scale.md); stdout if empty. With "
                                             "--execute: the result JSON")
    p.add_argument("--date", default=datetime.date.today().isoformat())
    p.add_argument("--case_timeout", type=int, default=4 * 3600)
    p.add_argument("--fast_compile", type=int, default=1, help="1: XLA CPU backend at -O0 (faster, same sizes)")
    p.add_argument("--report_only", action="store_true",
                   help="render the cached cases without compiling the missing ones (still records the command)")
    p.add_argument("--recompile", action="store_true", help="compile this command's cases even when cached")
    p.add_argument("--execute", action="store_true",
                   help="run the step for real on this machine's accelerator (one --devices count, one model, one "
                        "step) at --execute_batch and compare its peak memory with the cached CPU prediction; "
                        "writes the JSON to --out")
    p.add_argument("--execute_batch", type=int, default=16, help="per-device batch of --execute")
    p.add_argument("--execute_steps", type=int, default=3, help="train steps of --execute")
    p.add_argument("--device_probes", default="", help="--execute: per-device batches at which the step is first "
                   "compiled (not run) on the device, for the device-compiled prediction, e.g. 8,16")
    p.add_argument("--compile_options", default="",
                   help="--execute: XLA options for the step's compile, name=value,... (e.g. "
                        "xla_gpu_autotune_level=0: no GEMM autotuning, a shorter GPU compile)")
    p.add_argument("--record", default="", help="an --execute JSON to add to the cache's measurements; rewrites "
                                                "--out from the recorded commands (compiles nothing). A run cut "
                                                "short after its compile is recorded with its compiled peak")
    p.add_argument("--note", default="", help="--record: a sentence stored with the run and shown in the report "
                                              "(e.g. why its steps did not run)")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    p.add_argument("--_devices_one", dest="devices_one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_model_one", dest="model_one", help=argparse.SUPPRESS)
    p.add_argument("--_step_one", dest="step_one", help=argparse.SUPPRESS)
    p.add_argument("--_remat_one", dest="remat_one", help=argparse.SUPPRESS)
    return p


def _compile_cases(args, argv: list[str], cache: dict, cache_path: str, registry: dict) -> list[str]:
    """Records this command and its cases in the cache, then compiles each case the cache lacks (all of them with
    --recompile, none with --report_only) in its own subprocess, saving the cache after each; returns their keys."""
    compiled_now: list[str] = []
    devices = [int(d) for d in parse_list(args.devices, None, "devices")]
    models = parse_list(args.models, None, "models")
    steps = parse_list(args.steps, STEPS, "steps")
    remats = [{"on": True, "off": False}[r] for r in parse_list(args.rl_remat, ("on", "off"), "rl_remat")]
    mesh = parse_mesh(args.mesh)
    batches = [int(b) for b in args.batches.split(",")]
    if len(set(batches)) < 2:
        print("note: one per-device batch size: memory is reported, the batch fit is not", file=sys.stderr)
    cases = [(n, m, s, r) for n in devices for m in models for s in steps
             for r in (remats if s == "rl" else [None])]
    command = _command_key(argv)
    registry[command] = dict(date=args.date, cases=[
        [case_key(n, mesh, m, s, r, batches), f"N={n} {m} {s}{_remat_label(r)}"] for n, m, s, r in cases])
    _save_cache(cache_path, cache)
    for n, m, s, r in cases:
        key = case_key(n, mesh, m, s, r, batches)
        if args.report_only or (key in cache and "error" not in cache[key] and not args.recompile):
            continue
        print(f"[scale_check] {key}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            rec = _spawn(args, n, m, s, r, os.path.join(tmp, "result.json"))
        rec.setdefault("devices", n), rec.setdefault("model", m), rec.setdefault("step", s)
        rec.setdefault("remat", r)
        cache[key] = rec
        compiled_now.append(key)
        _save_cache(cache_path, cache)
    return compiled_now


def _remat_label(remat: bool | None) -> str:
    return "" if remat is None else (" remat on" if remat else " remat off")


def _write_report(args, cache: dict, registry: dict, hbm: dict[str, float]) -> None:
    """Renders every recorded command's cases (and the recorded --execute runs) to --out, or prints it."""
    records, missing, seen = [], [], set()
    for entry in registry.values():
        for key, label in entry["cases"]:
            if key in seen:
                continue
            seen.add(key)
            if key in cache:
                records.append(cache[key])
            else:
                missing.append(label)
    commands = [dict(command=c, date=e.get("date", "")) for c, e in registry.items()]
    text = render(records, hbm, args.hbm_fraction, commands, missing=missing,
                  measured=list(cache.get("_measured", {}).values()))
    if args.out:
        from marval_jax.tools.scale_check.tpu import keep_block  # the --target=tpu section stays (no libtpu import)
        old = open(args.out).read() if os.path.exists(args.out) else ""
        with open(args.out, "w") as f:
            f.write(keep_block(old, text))
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
