"""Measurement: the `--execute` validation on a real device, the memory fit peak(b) = fixed + b * per_example, and the
worker subprocesses with their result cache."""
from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any, Callable
from marval_jax.user_errors import UserError

from marval_jax.tools.scale_check.cases import (
    GB, STEPS, _root, _state_breakdown, _tree_bytes_per_device, build_case, load_config, parse_list, parse_mesh,
    parse_options, run_case,)


def _outside_steps(path: str) -> bool:
    """Files no train step imports (benchmarks, evaluation, CLI entry points, other tools): edits there leave the
    compiled programs unchanged, so they do not make a stamp dirty."""
    return (path.startswith(("marval_jax/benchmarks/", "marval_jax/evaluation/", "marval_jax/main.py",
                             "marval_jax/programs/demo.py")) or
            (path.startswith("marval_jax/tools/") and not path.startswith("marval_jax/tools/scale_check/")))


def _commit() -> str | None:
    """The repository's short commit, with "+dirty" when the code differs from it (None outside a git checkout)."""
    root = _root()
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=30)
        if head.returncode:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--", "marval_jax", "configs"], cwd=root,
                                capture_output=True, text=True, timeout=30).stdout.splitlines()
        dirty = [line[3:] for line in status if not line.startswith("??") and not _outside_steps(line[3:])]
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------------------ execute
def _memory_analysis(compiled) -> dict | None:
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001  (a backend without it)
        return None
    if ma is None:
        return None
    out = dict(argument=int(ma.argument_size_in_bytes), output=int(ma.output_size_in_bytes),
               alias=int(ma.alias_size_in_bytes), temp=int(ma.temp_size_in_bytes))
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    if getattr(ma, "peak_memory_in_bytes", None) is not None:
        out["compiler_peak"] = int(ma.peak_memory_in_bytes)
    return out


def _memory_stats(device) -> dict | None:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  (CPU: None or not implemented)
        return None
    if not stats:
        return None
    return {k: int(stats[k]) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit", "largest_alloc_size")
            if k in stats}


def find_prediction(cache: dict, devices: int, mesh_shape: dict, model: str, step: str, remat: bool | None,
                    batch: int, batches: list[int] | None = None) -> dict | None:
    """The cached CPU case for this device count / mesh / model / step (the one compiled at `batches` if cached,
    else the one whose probes bracket `batch`) and its fit evaluated at `batch`."""
    cands = [(k, r) for k, r in cache.items() if not k.startswith("_") and isinstance(r, dict)
             and "error" not in r and r.get("devices") == devices and r.get("model") == model
             and r.get("step") == step and r.get("remat") == remat and r.get("mesh") == mesh_shape
             and fit(r) is not None]
    if not cands:
        return None

    def rank(kr):
        k, r = kr
        bs = sorted(p["per_device_batch"] for p in r["probes"])
        return (batches is None or k.split("|b=")[-1] != ",".join(map(str, batches)), not bs[0] <= batch <= bs[-1],
                -bs[-1])
    key, rec = sorted(cands, key=rank)[0]
    fixed, per = fit(rec)
    probe = next((p for p in rec["probes"] if p["per_device_batch"] == batch), None)
    return dict(key=key, fixed=fixed, per_example=per, predicted_peak=fixed + batch * per,
                probe_peak=None if probe is None else probe["peak"], cpu_jax=rec.get("jax"),
                commit=rec.get("commit"), date=rec.get("date"))


def _write_json(path: str, obj: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def execute_case(model: str, step: str, mesh_spec: dict | None, remat: bool | None, batch: int, num_steps: int,
                 rl_num_iter: int, devices: int, cache: dict, batches: list[int] | None, out: str = "",
                 seed: int = 0, compile_options: dict | None = None, command: str | None = None,
                 device_probes: list[int] | None = None) -> dict:
    """Runs the train step for real on the first `devices` accelerators and measures its memory.

    `device_probes` (e.g. [8, 16]): before that, the same step is compiled (not run) on this backend at each of
    these per-device batches, and the device's own fit fixed + b x per_example of their compiled peaks, plus the
    state the step does not read but the device holds (`state_not_read`), is the device-compiled prediction of the
    allocator's peak at `batch`. With `batch` outside the probes that is a prediction in the proper sense (no
    number of the executed program enters it), the way the table's GPU rows would be made on the target compiler.

    The same task, shardings and jit as the compile-only cases (and as `marval_jax.train.loop`): the step is
    compiled first (on abstract shapes, so compile-time allocations do not add to the peak), then the state is made
    leaf by leaf on its shardings (`random_init.random_like` with `train_state_rule`: parameters, EMA and frozen
    copies N(0, 0.02^2) drawn on the host, optimizer state zeros on the device; jitting `init_state` instead
    compiles one program for the three MAR copies: the benchmark suite's one-program MAR-B init was still compiling
    on the H200 when the suite was killed at 435 s, and this path's run of 2026-11-29 was killed in that phase), a
    fixed random batch is made the same way, and `num_steps` steps run with the state donated. Reports the
    compiled program's memory_analysis on this backend, the allocator's `peak_bytes_in_use` (None where the backend
    keeps no statistics, e.g. CPU) and the cached CPU prediction (fixed + batch x per_example of the matching
    compile-only case) with the relative differences. The JSON at
    `out` is written before the compile and rewritten after each phase (`phase` names the one in progress), so a
    run cut short still leaves what it measured and where it stopped. `compile_options`
    (XLA debug options, e.g. {"xla_gpu_autotune_level": 0}) go to the step's compile; one this XLA rejects is
    dropped (noted in the JSON) and the step compiled with the defaults.
    """
    import jax

    t_start = time.time()
    all_devices = jax.devices()
    if devices > len(all_devices):
        raise RuntimeError(f"--devices {devices}: only {len(all_devices)} {all_devices[0].platform} devices here")
    devs = all_devices[:devices]
    # a first record before building the task (config, shapes, shardings: seconds), so even that is visible
    _write_json(out, dict(mode="execute", phase="build", devices=devices, model=model, step=step,
                          per_device_batch=batch, num_steps=num_steps, device_kind=getattr(devs[0], "device_kind", "?"),
                          platform=devs[0].platform, jax=jax.__version__, date=datetime.date.today().isoformat(),
                          command=command))
    env = _execute_setup(step, model, mesh_spec, remat, rl_num_iter, batch, seed, devs)
    rec = _execute_record(env, devs, model, step, remat, batch, num_steps, rl_num_iter, command, out)
    rec["prediction"] = pred = find_prediction(cache, devices, dict(env.mesh.shape), model, step, remat, batch,
                                               batches)
    phase = _phase_writer(rec, out, t_start)
    rec["compile_options"] = dict(compile_options or {})
    compile_at = _step_compiler(env, rec)
    probes_b = [b for b in (device_probes or []) if b != batch]
    if probes_b:
        rec["device_probes"] = []
        for b in probes_b:
            phase(f"probe b={b}")
            compiled, secs = compile_at(b)
            rec["device_probes"].append(dict(per_device_batch=b, compile_s=secs, **(_memory_analysis(compiled) or {})))
            del compiled
            _write_json(out, rec)
    phase("compile")
    compiled = _compile_executed(rec, compile_at, batch, pred, devs[0])
    phase("init")
    state, batch_arr, extra = _random_inputs(rec, env, seed)
    rec["memory_after_init"] = _memory_stats(devs[0])
    _run_steps(rec, out, phase, compiled, (state, batch_arr, extra), num_steps, devs[0])
    _compare_peaks(rec, pred)
    rec["total_s"] = round(time.time() - t_start, 1)
    rec["phase"] = "done"
    _write_json(out, rec)
    print(execute_summary(rec), flush=True)
    return rec


def _execute_setup(step: str, model: str, mesh_spec: dict | None, remat: bool | None, rl_num_iter: int, batch: int,
                   seed: int, devs: list) -> SimpleNamespace:
    """The case's task, mesh, abstract state with its shardings and the abstract batch, as the compile-only cases
    (and `marval_jax.train.loop`) build them, on the devices `devs`."""
    import jax
    from marval_jax.parallel import mesh as mesh_lib
    from marval_jax.parallel import sharding as shd
    from marval_jax.train.loop import state_shardings

    config = load_config(step, model, mesh_spec, remat, rl_num_iter)
    built = build_case(step, config)
    mesh = mesh_lib.make_mesh(config.mesh, devices=devs)
    rules = config.mesh.logical_axis_rules
    abstract = jax.eval_shape(built.init_state, jax.random.PRNGKey(seed))
    shardings = state_shardings(abstract, built, mesh, rules)
    batch_shd = shd.batch_sharding(mesh, rules)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return SimpleNamespace(config=config, built=built, mesh=mesh, abstract=abstract, shardings=shardings,
                           batch_shd=batch_shd, repl=shd.replicated(mesh), shards=shards,
                           extra_shd=built.extra_shardings(mesh, rules),
                           batch_abstract=built.batch_fn(batch * shards))


def _execute_record(env: SimpleNamespace, devs: list, model: str, step: str, remat: bool | None, batch: int,
                    num_steps: int, rl_num_iter: int, command: str | None, out: str) -> dict[str, Any]:
    """The --execute JSON's fields known before anything is compiled: the case, the device, the state by kind."""
    import jax
    breakdown = _state_breakdown(env.abstract, env.shardings)
    return dict(
        mode="execute", devices=len(devs), model=model, step=step, remat=remat, mesh=dict(env.mesh.shape),
        per_device_batch=batch, global_batch=batch * env.shards, num_steps=num_steps,
        rl_num_iter=rl_num_iter if step == "rl" else None, platform=devs[0].platform,
        device_kind=getattr(devs[0], "device_kind", "?"), jax=jax.__version__,
        xla_flags=os.environ.get("XLA_FLAGS", ""), state=breakdown, state_total=sum(breakdown.values()),
        batch_bytes=_tree_bytes_per_device(env.batch_abstract, env.batch_shd), model_dtype=str(env.config.model.dtype),
        commit=_commit(), date=datetime.date.today().isoformat(), command=command, out=out or None)


def _phase_writer(rec: dict, out: str, t_start: float) -> Callable[[str], None]:
    """phase(name): records the phase about to start and writes the JSON first, so a kill mid-phase is visible."""
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        rec["phase"] = name
        phases[name] = round(time.time() - t_start, 1)
        rec["phase_started_s"] = dict(phases)
        _write_json(out, rec)
        print(f"[scale_check --execute] {phases[name]:7.1f}s {name}", file=sys.stderr, flush=True)
    return phase


def _step_compiler(env: SimpleNamespace, rec: dict) -> Callable[[int], tuple[Any, float]]:
    """compile_at(b): the train step jitted as the loop jits it, lowered on abstract inputs at per-device batch b
    and compiled with rec["compile_options"]; (compiled, seconds). An option this XLA rejects is dropped (the error
    noted in rec, its options emptied) and the step compiled with the defaults, then and at every later batch."""
    import jax
    built, batch_shd = env.built, env.batch_shd
    jitted = jax.jit(built.train_step, in_shardings=(env.shardings, batch_shd) + env.extra_shd,
                     out_shardings=(env.shardings, None), donate_argnums=0)
    state_in = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      env.abstract, env.shardings)
    extra_in = tuple(jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), e, es)
                     for e, es in zip(built.extra, env.extra_shd))

    def compile_at(b: int):
        batch_in = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=batch_shd),
                                          built.batch_fn(b * env.shards))
        t0 = time.time()
        lowered = jitted.lower(state_in, batch_in, *extra_in)
        options = rec["compile_options"] or None
        try:
            compiled = lowered.compile(compiler_options=options)
        except Exception as e:  # noqa: BLE001  (an option this XLA does not know: compile with its defaults)
            if not options:
                raise
            rec["compile_options_error"], rec["compile_options"] = f"{type(e).__name__}: {str(e)[:300]}", {}
            compiled = lowered.compile()
        return compiled, round(time.time() - t0, 1)
    return compile_at


def _compile_executed(rec: dict, compile_at: Callable, batch: int, pred: dict | None, device) -> Any:
    """Compiles the step at the executed batch; records its memory_analysis, the state it does not read, the
    device-compiled prediction and the compiled peak against the CPU prediction."""
    compiled, rec["compile_s"] = compile_at(batch)
    rec["compiled"] = _memory_analysis(compiled)
    if rec["compiled"]:  # state leaves the step never reads (jit prunes them) stay allocated but are not arguments
        rec["state_not_read"] = max(0.0, rec["state_total"] + rec["batch_bytes"] - rec["compiled"]["argument"])
    rec["device_prediction"] = device_prediction(rec)
    rec["memory_after_compile"] = _memory_stats(device)
    if pred is not None and rec["compiled"]:
        rec["compiled_rel_diff"] = (rec["compiled"]["peak"] - pred["predicted_peak"]) / pred["predicted_peak"]
    print(f"[scale_check --execute] compiled in {rec['compile_s']:.0f}s; compiled peak "
          f"{(rec['compiled'] or {}).get('peak', float('nan')) / GB:.2f} GB", file=sys.stderr, flush=True)
    return compiled


def _random_inputs(rec: dict, env: SimpleNamespace, seed: int) -> tuple:
    """(state, batch, frozen extra inputs) made leaf by leaf on their shardings, no initialiser compiled; each state
    leaf its own buffer (donation needs one per leaf)."""
    import jax
    from marval_jax.benchmarks import random_init
    t0 = time.time()
    state = random_init.random_like(env.abstract, seed, random_init.train_state_rule, env.shardings)
    batch_arr = random_init.random_like(env.batch_abstract, seed + 1, random_init.data_rule, env.batch_shd)
    extra = tuple(random_init.random_like(e, seed + 2 + i, _frozen_input_rule, es)
                  for i, (e, es) in enumerate(zip(env.built.extra, env.extra_shd)))
    jax.block_until_ready((state, batch_arr, extra))
    rec["init_s"] = round(time.time() - t0, 1)
    rec["init"] = "random_init.random_like (host draws + device zeros, per leaf; no compiled initialiser)"
    try:  # donation needs one buffer per leaf (XLA copies repeated outputs, but check)
        ptrs = [x.unsafe_buffer_pointer() for x in jax.tree_util.tree_leaves(state)]
        if len(set(ptrs)) < len(ptrs):
            state = jax.tree_util.tree_map(lambda x: x.copy(), state)
    except Exception:  # noqa: BLE001  (no buffer pointers on this backend: leave as is)
        pass
    return state, batch_arr, extra


def _run_steps(rec: dict, out: str, phase: Callable[[str], None], compiled, inputs: tuple, num_steps: int,
               device) -> None:
    """`num_steps` steps with the state donated; after each, its time, loss and the allocator's statistics."""
    import jax
    import numpy as np
    state, batch_arr, extra = inputs
    step_s, losses = [], []
    for i in range(num_steps):
        phase(f"step {i + 1}/{num_steps}")
        t0 = time.time()
        state, metrics = compiled(state, batch_arr, *extra)
        jax.block_until_ready((state, metrics))
        step_s.append(round(time.time() - t0, 3))
        losses.append(float(np.asarray(metrics.get("loss", np.nan))))
        rec.update(step_s=step_s, loss=losses, memory=_memory_stats(device))
        _write_json(out, rec)


def _compare_peaks(rec: dict, pred: dict | None) -> None:
    """The allocator's peak against the CPU prediction and the device-compiled prediction (within 15%?)."""
    measured = (rec.get("memory") or {}).get("peak_bytes_in_use")
    if pred is not None and measured is not None:
        rec["rel_diff"] = (measured - pred["predicted_peak"]) / pred["predicted_peak"]
        rec["within_15pct"] = abs(rec["rel_diff"]) <= 0.15
    dpred = rec.get("device_prediction")
    if dpred is not None and measured is not None:
        rec["device_rel_diff"] = (measured - dpred["predicted_peak"]) / dpred["predicted_peak"]
        rec["device_within_15pct"] = abs(rec["device_rel_diff"]) <= 0.15


def device_prediction(rec: dict) -> dict | None:
    """The device-compiled prediction of an --execute run with --device_probes: fixed + b x per_example fitted to
    the device's compiled peaks at the probe batches, evaluated at the run's batch, plus the state the device holds
    but the program does not read (None without two distinct probes)."""
    probes = [p for p in rec.get("device_probes") or [] if "peak" in p]
    f = fit({"probes": probes})
    if f is None:
        return None
    fixed, per = f
    b = rec["per_device_batch"]
    unread = rec.get("state_not_read") or 0.0
    return dict(fixed=fixed, per_example=per, state_not_read=unread, predicted_peak=fixed + b * per + unread,
                probe_batches=sorted(p["per_device_batch"] for p in probes),
                interpolated=min(p["per_device_batch"] for p in probes) <= b <= max(p["per_device_batch"]
                                                                                     for p in probes))


def _frozen_input_rule(names, leaf):
    """Frozen jit arguments (RL: reward and VAE decoder weights, prompt embeddings): weights as parameters,
    integers a class id."""
    import jax.numpy as jnp
    from marval_jax.benchmarks import random_init
    if jnp.issubdtype(leaf.dtype, jnp.integer):
        return ("randint", 0, 10)
    return random_init.param_rule(names, leaf)


def executed_steps(rec: dict) -> int:
    return len(rec.get("step_s") or [])


def measured_key(m: dict) -> str:
    """Key of a recorded --execute run: one per device, case, date and extent (a run cut short before its steps
    stays listed beside a later complete run of the same case)."""
    extent = "steps" if executed_steps(m) else "compile-only"
    return (f"{m['device_kind']}|n={m['devices']}|{m['model']}|{m['step']}|b={m['per_device_batch']}|"
            f"{m.get('date', '?')}|{extent}")


def not_executed_reason(m: dict) -> str | None:
    """Why a recorded run has no executed peak (None if its steps ran): the --note, else what its JSON shows."""
    if executed_steps(m):
        return None
    # a JSON written before runs carried their phase: inferred from what is there
    phase = m.get("phase") or ("step 1" if "init_s" in m else "init" if m.get("compiled") else "compile")
    where = {"build": "while the task was being built", "compile": "during the step's compile",
             "init": "after the step's compile, before the state was initialised and any step ran"}
    text = "the run ended " + where.get(phase, f"during {phase}, before a step completed")
    return f"{m['note'].rstrip('.')}; {text}" if m.get("note") else text


def execute_summary(rec: dict) -> str:
    """One line: measured and compiled peaks on the device against the CPU prediction."""
    gb = lambda x: "n/a" if x is None else f"{x / GB:.2f} GB"  # noqa: E731
    measured = (rec.get("memory") or {}).get("peak_bytes_in_use")
    compiled = (rec.get("compiled") or {}).get("peak")
    pred = rec.get("prediction")
    text = (f"[scale_check --execute] {rec['device_kind']} x{rec['devices']} {rec['model']} {rec['step']} "
            f"b={rec['per_device_batch']} ({len(rec.get('step_s', []))} steps): peak_bytes_in_use {gb(measured)}, "
            f"compiled peak {gb(compiled)}, CPU prediction "
            + (f"{gb(pred['predicted_peak'])} ({pred['key']})" if pred else "n/a (no cached CPU case)"))
    if rec.get("rel_diff") is not None:
        text += (f"; measured vs prediction {100 * rec['rel_diff']:+.1f}% "
                 f"({'within' if rec['within_15pct'] else 'NOT within'} 15%)")
    if rec.get("compiled_rel_diff") is not None:
        text += f"; compiled vs prediction {100 * rec['compiled_rel_diff']:+.1f}%"
    dpred = rec.get("device_prediction")
    if dpred is not None:
        text += (f"; device-compiled prediction {gb(dpred['predicted_peak'])} (fit of b="
                 f"{','.join(map(str, dpred['probe_batches']))})")
        if rec.get("device_rel_diff") is not None:
            text += (f", measured vs it {100 * rec['device_rel_diff']:+.1f}% "
                     f"({'within' if rec['device_within_15pct'] else 'NOT within'} 15%)")
    return text


# ------------------------------------------------------------------------------------------------ model / report
def fit(record: dict) -> tuple[float, float] | None:
    """(fixed, per_example) bytes of peak(b) = fixed + b * per_example from the two smallest distinct probes."""
    probes = sorted(record.get("probes", []), key=lambda p: p["per_device_batch"])
    if len(probes) < 2 or probes[0]["per_device_batch"] == probes[-1]["per_device_batch"]:
        return None
    p1, p2 = probes[0], probes[-1]
    per = (p2["peak"] - p1["peak"]) / (p2["per_device_batch"] - p1["per_device_batch"])
    return p1["peak"] - p1["per_device_batch"] * per, per


def max_batch(fixed: float, per: float, hbm_gb: float, fraction: float) -> int:
    budget = fraction * hbm_gb * GB - fixed
    if budget < per:
        return 0
    return int(budget // per) if per > 0 else 10 ** 9


# ------------------------------------------------------------------------------------------------ driver
def _worker_main(args) -> int:
    rec = run_case(args.devices_one, args.model_one, args.step_one, parse_mesh(args.mesh),
                   None if args.remat_one == "none" else args.remat_one == "on",
                   [int(b) for b in args.batches.split(",")], args.rl_num_iter)
    with open(args.result, "w") as f:
        json.dump(rec, f)
    return 0


def _spawn(args, n: int, model: str, step: str, remat: bool | None, result: str) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={n}")
    if args.fast_compile:
        flags.append("--xla_backend_optimization_level=0")  # LLVM -O0: same buffer assignment, ~2x faster
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    root = _root()
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "marval_jax.tools.scale_check", "--_worker", "--result", result,
           "--_devices_one", str(n), "--_model_one", model, "--_step_one", step,
           "--_remat_one", "none" if remat is None else ("on" if remat else "off"),
           "--batches", args.batches, "--rl_num_iter", str(args.rl_num_iter), "--mesh", args.mesh or "config"]
    t0 = time.time()
    commit = _commit()  # the code this case is compiled from (read before the worker starts)
    log_path = result + ".log"  # a file, not a pipe: the worker survives its parent (and keeps its output)
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, env=env, cwd=root, timeout=args.case_timeout, stderr=log, text=True)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {args.case_timeout}s", "commit": commit, "date": args.date}
    with open(log_path) as f:
        err = f.read()
    sys.stderr.write(err[-4000:] if proc.returncode else "".join(
        l + "\n" for l in err.splitlines() if l.startswith("  b=")))
    if proc.returncode:
        lines = [l for l in err.strip().splitlines() if l.strip()]
        exc = [l for l in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b", l)]
        return {"error": f"exit {proc.returncode}: {(exc or lines or ['?'])[-1]}", "commit": commit,
                "date": args.date}
    with open(result) as f:
        rec = json.load(f)
    rec["wall_s"] = round(time.time() - t0, 1)
    rec["commit"], rec["date"] = commit, args.date
    return rec


def _command_key(argv: list[str]) -> str:
    """The command line without the switches that do not change its cases (--date, --report_only, --recompile)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--report_only", "--recompile"):
            continue
        if a == "--date":
            skip = True
            continue
        if a.startswith("--date="):
            continue
        out.append(a)
    return "python -m marval_jax.tools.scale_check " + " ".join(out)


def _save_cache(path: str, cache: dict) -> None:
    if path:
        _write_json(path, cache)


def _execute_main(args) -> int:
    devices = int(args.devices)
    (model,) = parse_list(args.models, None, "models")
    (step,) = parse_list(args.steps, STEPS, "steps")
    remat = {"on": True, "off": False}[parse_list(args.rl_remat, ("on", "off"), "rl_remat")[0]] \
        if step == "rl" else None
    cache_path = args.cache or os.path.join(_root(), "docs", "scale.json")
    cache = {}
    if os.path.exists(cache_path):
        with open(cache_path) as f:
            cache = json.load(f)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    out = args.out or default_execute_out(model, step, args.execute_batch)
    print(f"[scale_check --execute] writing {out} (before the compile and after every phase)", file=sys.stderr,
          flush=True)
    probes = [int(b) for b in args.device_probes.split(",") if b.strip()]
    if probes and len(set(probes) - {args.execute_batch}) < 2:
        raise UserError(f"--device_probes needs two batches other than --execute_batch, got {args.device_probes!r}")
    execute_case(model, step, parse_mesh(args.mesh), remat, args.execute_batch, args.execute_steps,
                 args.rl_num_iter, devices, cache, batches, out=out,
                 compile_options=parse_options(args.compile_options), command=_command_key(list(args.argv or [])),
                 device_probes=probes)
    return 0


def default_execute_out(model: str, step: str, batch: int) -> str:
    """--execute without --out: a JSON in the working directory named after the case."""
    return f"scale_execute_{model}_{step}_b{batch}.json"
