"""The markdown report (docs/scale.md) of the cached cases: tables, the device validation section and the findings."""
from __future__ import annotations

import re

from marval_jax.tools.scale_check.cases import GB, STEPS
from marval_jax.tools.scale_check.measurement import (
    device_prediction, executed_steps, fit, max_batch, not_executed_reason,)


def _gb(x: float) -> str:
    """Bytes as GB with 3 significant digits (tiny test models stay readable)."""
    v = x / GB
    return f"{v:.2f}" if v >= 1 else f"{v:.3g}"


def _frozen_args(rec: dict) -> float:
    """Frozen jit arguments per device (RL: reward, VAE decoder, prompts) as the compiled program keeps them."""
    kept = [p.get("frozen_args_kept") for p in rec.get("probes", []) if p.get("frozen_args_kept") is not None]
    if rec.get("frozen_args") and kept:
        return float(min(kept))
    return float(sum(rec.get("frozen_args", {}).values()))


def _step_label(rec: dict) -> str:
    if rec["step"] == "rl":
        return f"RL K={rec.get('rl_num_iter')} remat {'on' if rec.get('remat') else 'off'}"
    return {"mar": "MAR", "mar_fix": "MAR, rows fix", "gsim": "GSIM"}[rec["step"]]


LEGACY = "before 5998cc3"  # cases cached before records carried their commit (the table of 2026-11-29)


H200_COMMAND = ("python -m marval_jax.tools.scale_check --execute --devices 1 --models base --steps gsim "
                "--mesh data=1,fsdp=1,tensor=1 --batches 8,16 --execute_batch 32 --device_probes 8,16 "
                "--execute_steps 3 --compile_options xla_gpu_autotune_level=0 --out $OUT/h200_gsim.json")


RECORD_COMMAND = "python -m marval_jax.tools.scale_check --record $OUT/h200_gsim.json --out docs/scale.md"


def _code(rec: dict) -> str:
    return rec.get("commit") or LEGACY


def _commands_block(commands) -> list[str]:
    if isinstance(commands, str):
        commands = [dict(command=commands)]
    out = []
    for c in commands:
        out += [f"    {c['command']}" + (f"    # {c['date']}" if c.get("date") else ""), ""]
    return out


def render(records: list[dict], hbm: dict[str, float], fraction: float, commands, date: str = "",
           missing: list[str] = (), measured: list[dict] = ()) -> str:
    """The markdown report. `commands`: the command line (str) or [{"command", "date"}, ...] of every command
    whose cases are in `records`; `measured`: `--execute` results recorded with --record."""
    if isinstance(commands, str):
        commands = [dict(command=commands, date=date)]
    lines = _intro_lines(commands, fraction)
    ok = [r for r in records if "error" not in r]
    findings = _findings(ok) + _error_findings([r for r in records if "error" in r])
    if findings:
        lines += ["## Findings", ""] + [f"- {f}" for f in findings] + [""]
    for n in sorted({r["devices"] for r in ok}):
        lines += _devices_section(n, ok, hbm, fraction, measured)
    lines += _validation_section(measured, ok)
    lines += _config_mesh_section(ok)
    lines += _what_ran_section(ok, [r for r in records if "error" in r])
    if missing:
        lines += ["Not run yet (the commands above compile them): " + "; ".join(missing) + ".", ""]
    return "\n".join(lines)


_MODEL_LETTER = {"base": "B", "large": "L", "huge": "H"}


def _intro_lines(commands: list[dict], fraction: float) -> list[str]:
    """The report's title and the paragraphs on what is measured, the memory model, the caveat and the steps."""
    import jax
    return [
        "# Scale check: per-device memory of the train steps",
        "",
        f"Produced with jax {jax.__version__} on CPU with forced host devices (nothing allocated) by the commands below",
        "(each with the date it was last run; the `code` column of `What ran` gives the commit each case was compiled",
        "at):",
        "",
        *_commands_block(commands),
        "Each case (N, model, step) is compiled in its own process and cached in the JSON next to the report",
        "(`--cache`), which also records the commands; rerunning any of them compiles only what the cache lacks",
        "(`--recompile`: everything it names) and rewrites the report from every recorded command.",
        "",
        "What is measured. For each device count N the train step of each config is lowered and compiled for an SPMD",
        "mesh of N simulated CPU devices with the config's logical axis rules (batch over data x fsdp, `embed` over",
        "fsdp, `mlp` over tensor), exactly as `marval_jax.train.loop` jits it (state in/out shardings, donated",
        "state), on `ShapeDtypeStruct`s: no weights are allocated. `compiled.memory_analysis()` gives per-device",
        "argument, output, aliased (donated) and temporary bytes of the partitioned program; state bytes by kind come",
        "from the shardings (shard shape x itemsize). 1 GB = 1e9 bytes.",
        "",
        "Memory model. peak(b) = arguments + outputs - aliased + temporaries at per-device batch b (examples per",
        "data x fsdp shard). It is measured at two batch sizes and fitted as **peak(b) = fixed + b x per_example**",
        "(fixed = state + batch-independent temporaries such as all-gathered FSDP weights). The largest per-device",
        f"batch for an HBM size H is floor(({fraction:g} x H - fixed) / per_example); {fraction:g} leaves headroom for",
        "the runtime, fragmentation and the difference between the CPU and TPU/GPU compilers (fusion, layouts).",
        "`cfg b` is the config's global batch divided over the batch shards at N; 0 in a column means it does not",
        "fit at batch 1.",
        "",
        "Caveat: these are the CPU compiler's buffer assignments for the same partitioned HLO. TPU and GPU compilers",
        "fuse differently (bf16 kept native, different layouts and rematerialisation), so the absolute numbers are",
        "estimates. One device's numbers can be checked against a real run: a 64-device mesh does not fit on one",
        "H200, so the `N = 1` section compiles the MARVAL-B GSIM step for a single device (the same program an H200",
        "runs), and `--execute` runs that step on the accelerator (section `H200 validation`).",
        "",
        "Steps. `MAR`: `make_mar_task(configs/mar.py:V)`'s step. `MAR, rows fix`: the candidate per-copy head rows",
        "layout measured beside it, now `losses/mar_loss.diffusion_loss` itself (see Findings). `GSIM`:",
        "`make_distill_task(configs/marval.py:V)`: frozen teacher + generator + fake score (three MAR copies), the two",
        "trained roles with Adam moments and EMA. `RL K=.. remat on/off`: `make_rl_task(configs/marval_rl.py:V)`'s",
        "step with rl.num_iter = K and rl.remat as stated; its frozen PickScore reward (CLIP ViT-H/14 at its real",
        "size, float32 as rl.reward_config.dtype), KL-16 VAE decoder and class-prompt embeddings enter as replicated",
        "jit arguments (jit drops the unused CLIP text tower) and count under `frozen` with the reference generator.",
        "Columns: state by kind per device (GB), `fixed` and `per ex.` of the fit (GB), the probes' peaks (GB), the",
        "config's per-device batch, and the largest per-device batch per HBM size.",
        "",
    ]


def _devices_section(n: int, ok: list[dict], hbm: dict[str, float], fraction: float, measured) -> list[str]:
    """## N = n devices: one row per compiled case at n devices, then the recorded runs' device-compiled rows."""
    names = _MODEL_LETTER
    rows = sorted([r for r in ok if r["devices"] == n], key=lambda r: (
        ["base", "large", "huge"].index(r["model"]) if r["model"] in names else 9, STEPS.index(r["step"]),
        not r.get("remat")))
    meshes = sorted({",".join(f"{k}={v}" for k, v in r["mesh"].items()) for r in rows})
    title = "1 device (one H200" if n == 1 else f"{n} devices ("
    lines = [f"## N = {title}{'; ' if n == 1 else ''}mesh {'; '.join(meshes)})", ""]
    dev_rows = [(m, _cpu_case(ok, m)) for m in _device_compiled_runs(measured) if m["devices"] == n]
    if n == 1:
        lines += ["The single-device program that a real run on one accelerator executes; its CPU-compiled GSIM",
                  "row is the CPU prediction the `H200 validation` section compares with."]
    lines += _device_rows_intro([m for m, _ in dev_rows], [m for m in measured if m.get("devices") == n])
    if n == 1 or dev_rows:
        lines.append("")
    head = ("| model | step | params | opt | EMA | frozen | state | fixed | per ex. | probes b: peak | cfg b | "
            + " | ".join(f"{k} {v:g} GB" for k, v in hbm.items()) + " |")
    lines += [head, "|" + "---|" * (11 + len(hbm))]
    for r in rows:
        s = r["state"]
        frozen = s["frozen"] + _frozen_args(r)
        f = fit(r)
        cfg_b = r["config_global_batch"] / r["batch_shards"]
        probes = ", ".join(f"{p['per_device_batch']}: {_gb(p['peak'])}" for p in r["probes"])
        if f is None:
            fixed_s = per_s = "?"
            fits = ["?"] * len(hbm)
        else:
            fixed, per = f
            fixed_s, per_s = _gb(fixed), _gb(per)
            fits = [str(max_batch(fixed, per, h, fraction)) for h in hbm.values()]
        model = f"MAR{'VAL' if r['step'] in ('gsim', 'rl') else ''}-{names.get(r['model'], r['model'])}"
        lines.append(
            f"| {model} | {_step_label(r)} | {_gb(s['params'])} | {_gb(s['optimizer'])} | "
            f"{_gb(s['ema'])} | {_gb(frozen)} | {_gb(r['state_total'] + _frozen_args(r))} | "
            f"{fixed_s} | {per_s} | {probes} | {cfg_b:g} | " + " | ".join(fits) + " |")
    for m, cpu in dev_rows:
        lines.append(_device_compiled_row(m, cpu, hbm, fraction))
    lines.append("")
    return lines


def _config_mesh_section(ok: list[dict]) -> list[str]:
    """## State per device with the configs' own mesh (from the shardings; empty if no case recorded it)."""
    cfg_rows = [r for r in ok if r.get("config_mesh_state") and "error" not in r["config_mesh_state"]]
    if not cfg_rows:
        return []
    lines = ["## State per device with the configs' own mesh (from shardings, no compile)", "",
             "| N | model | step | config mesh | params | opt | EMA | frozen | state |", "|" + "---|" * 9]
    seen = set()
    for r in sorted(cfg_rows, key=lambda r: (r["devices"], r["model"], r["step"])):
        key = (r["devices"], r["model"], r["step"])
        if key in seen:
            continue
        seen.add(key)
        c = r["config_mesh_state"]
        tot = sum(c[k] for k in ("params", "optimizer", "ema", "frozen", "other"))
        lines.append(f"| {r['devices']} | {r['model']} | {r['step']} | "
                     f"{','.join(f'{k}={v}' for k, v in c['shape'].items())} | {_gb(c['params'])} | "
                     f"{_gb(c['optimizer'])} | {_gb(c['ema'])} | {_gb(c['frozen'])} | {_gb(tot)} |")
    lines.append("")
    return lines


def _what_ran_section(ok: list[dict], bad: list[dict]) -> list[str]:
    """## What ran: every case's per-device batches, compile times and code, the failed ones with their error."""
    lines = ["## What ran", "",
             "| N | model | step | per-device batches | compile s (each) | code |", "|---|---|---|---|---|---|"]
    for r in sorted(ok, key=lambda r: (r["devices"], r["model"], r["step"], not r.get("remat"))):
        lines.append(f"| {r['devices']} | {r['model']} | {_step_label(r)} | "
                     f"{', '.join(str(p['per_device_batch']) for p in r['probes'])} | "
                     f"{', '.join(str(int(p['compile_s'])) for p in r['probes'])} | {_code(r)} |")
    for r in bad:
        remat = "" if r.get("remat") is None else (" remat on" if r["remat"] else " remat off")
        lines.append(f"| {r['devices']} | {r['model']} | {r['step']}{remat} | failed | {r['error'][:200]} | "
                     f"{_code(r)} |")
    lines.append("")
    return lines


def _cpu_cases(records: list[dict], m: dict) -> list[dict]:
    """The compile-only CPU cases of a recorded run's device count, model, step, remat and mesh."""
    return [r for r in records if (r.get("devices"), r.get("model"), r.get("step"), r.get("remat"), r.get("mesh"))
            == (m["devices"], m["model"], m["step"], m.get("remat"), m.get("mesh"))]


def _cpu_case(records: list[dict], m: dict) -> dict | None:
    """The CPU case whose row a recorded run's device-compiled row stands beside (the one its prediction used)."""
    cases = _cpu_cases(records, m)
    key = (m.get("prediction") or {}).get("key", "")
    keyed = [r for r in cases if key.endswith("|b=" + ",".join(str(p["per_device_batch"]) for p in r["probes"]))]
    return (keyed or cases or [None])[0]


def _cpu_probe(records: list[dict], m: dict) -> dict | None:
    """The compile-only CPU probe of the run's case at the run's per-device batch (its prediction's source)."""
    for r in _cpu_cases(records, m):
        for p in r.get("probes", []):
            if p["per_device_batch"] == m["per_device_batch"]:
                return p
    return None


def _device_name(kind: str) -> str:
    """A recorded run's device_kind as the tables name it: 'NVIDIA H200' -> 'H200'."""
    return re.sub(r"^(NVIDIA|AMD)\s+", "", kind or "?")


def _device_compiled_runs(measured) -> list[dict]:
    """The recorded --execute runs with a device-compiled prediction (--device_probes), the newest per device and
    case (by date, then executed steps, then the order they were recorded in)."""
    newest: dict[tuple, dict] = {}
    for m in sorted(measured, key=lambda m: (m.get("date", ""), executed_steps(m))):
        if device_prediction(m) is not None:
            mesh = tuple(sorted((m.get("mesh") or {}).items()))
            newest[(m["device_kind"], m["devices"], m["model"], m["step"], m.get("remat"), mesh)] = m
    return list(newest.values())


def _device_row_label(m: dict) -> str:
    d = device_prediction(m)
    return (f"{_step_label(m)}, {_device_name(m['device_kind'])}-compiled "
            f"(b={','.join(map(str, d['probe_batches']))})")


def _device_allocator_diff(m: dict) -> float | None:
    """The allocator's peak of an executed run relative to its device-compiled prediction (None if not measured)."""
    mem = (m.get("memory") or {}).get("peak_bytes_in_use")
    d = device_prediction(m)
    if mem is None or d is None or not executed_steps(m):
        return None
    return (mem - d["predicted_peak"]) / d["predicted_peak"]


def _device_compiled_row(m: dict, cpu: dict | None, hbm: dict[str, float], fraction: float) -> str:
    """The table row of a recorded run's device-compiled fit (`device_prediction`): `fixed` includes the state the
    device holds but the step does not read, so fixed + b x per_example is the device-compiled prediction; the
    state columns are the run's (the CPU case's where the run lacks them), `cfg b` the CPU case's."""
    names = {"base": "B", "large": "L", "huge": "H"}
    d = device_prediction(m)
    fixed, per = d["fixed"] + d["state_not_read"], d["per_example"]
    src = m if m.get("state") else (cpu or {})
    s = src.get("state")
    frozen_args = _frozen_args(cpu) if cpu else 0.0
    if s:
        state_s = (f"{_gb(s['params'])} | {_gb(s['optimizer'])} | {_gb(s['ema'])} | {_gb(s['frozen'] + frozen_args)}"
                   f" | {_gb(src['state_total'] + frozen_args)}")
    else:
        state_s = " | ".join(["?"] * 5)
    cfg_b = f"{cpu['config_global_batch'] / cpu['batch_shards']:g}" if cpu else "?"
    probes = ", ".join(f"{p['per_device_batch']}: {_gb(p['peak'])}"
                       for p in sorted(m["device_probes"], key=lambda p: p["per_device_batch"]) if "peak" in p)
    # only the device's own HBM column: another chip's compiler lays the program out differently
    dev = _device_name(m["device_kind"]).lower()
    fits = [str(max_batch(fixed, per, h, fraction)) if dev in name.lower() else "-" for name, h in hbm.items()]
    model = f"MAR{'VAL' if m['step'] in ('gsim', 'rl') else ''}-{names.get(m['model'], m['model'])}"
    return (f"| {model} | {_device_row_label(m)} | {state_s} | {_gb(fixed)} | {_gb(per)} | {probes} | {cfg_b} | "
            + " | ".join(fits) + " |")


def _cpu_vs_device(measured: list[dict], kind: str) -> list[float]:
    """Recorded runs on `kind`: their allocator and compiled peaks relative to the CPU prediction."""
    out = []
    for m in measured:
        if m.get("device_kind") != kind or not m.get("prediction"):
            continue
        pred = m["prediction"]["predicted_peak"]
        if m.get("rel_diff") is not None and executed_steps(m):
            out.append(m["rel_diff"])
        if (m.get("compiled") or {}).get("peak"):
            out.append((m["compiled"]["peak"] - pred) / pred)
    return out


def _range(lo: float, hi: float, sign: str = "") -> str:
    """Percentages rounded to integers as 'lo% to hi' (the caller appends the last '%'); one number where both
    round alike."""
    a, b = f"{lo:{sign}.0f}", f"{hi:{sign}.0f}"
    return a if a == b else f"{a}% to {b}"


def _device_rows_intro(runs: list[dict], measured: list[dict]) -> list[str]:
    """Sentences above a table with device-compiled rows: what the CPU rows are on that device (from the recorded
    runs) and which row the executed run validates."""
    out = []
    for m in runs:
        dev, d = _device_name(m["device_kind"]), device_prediction(m)
        rels = _cpu_vs_device(measured, m["device_kind"])
        if rels and max(rels) < 0:
            where = "GPUs" if m.get("platform") == "gpu" else f"the {dev}"
            out.append(f"The CPU-compiled rows are upper bounds on {where}: XLA's CPU compiler holds the bf16 "
                       f"activations at near-f32 size, and the {dev} runs recorded in `H200 validation` peak "
                       f"{_range(-100 * max(rels), -100 * min(rels))}% below their CPU prediction (allocator and "
                       "compiled peaks).")
        elif rels:
            out.append(f"The {dev} runs recorded in `H200 validation` peak "
                       f"{_range(100 * min(rels), 100 * max(rels), '+')}% from their CPU prediction (allocator and "
                       "compiled peaks).")
        text = (f"The `{_device_row_label(m)}` row fits the step compiled on the {dev} (not run) at b = "
                f"{', '.join(map(str, d['probe_batches']))}; its `fixed` includes the {_gb(d['state_not_read'])} GB "
                "of state the device holds but the step does not read; it describes the step's code at "
                f"{m.get('commit') or '?'} and fills only the {dev}'s HBM column")
        rel = _device_allocator_diff(m)
        if rel is None:
            text += "; no allocator peak has been measured against it yet."
        else:
            mem = m["memory"]["peak_bytes_in_use"]
            text += (f". It is the row validated against the executed run ({m.get('date', '?')}, "
                     f"{m.get('commit') or '?'}): {_gb(d['predicted_peak'])} GB at b = {m['per_device_batch']}, "
                     f"the allocator's peak {_gb(mem)} GB is {_pct(rel)} from it "
                     f"({'within' if abs(rel) <= 0.15 else 'not within'} 15%).")
        out.append(text)
    return ["", " ".join(out)] if out else []


def _validation_summary(measured: list[dict]) -> list[str]:
    """Per device and case, the newest executed run with a device-compiled prediction: which prediction its
    allocator peak is within 15% of (computed from the run's JSON)."""
    out = []
    for m in _device_compiled_runs(measured):
        rel = _device_allocator_diff(m)
        if rel is None:
            continue
        d, mem, pred = device_prediction(m), m["memory"]["peak_bytes_in_use"], m.get("prediction")
        dev = _device_name(m["device_kind"])
        text = (f"**Which prediction holds** ({m['device_kind']} x{m['devices']}, b = {m['per_device_batch']}, run "
                f"of {m.get('date', '?')}, {m.get('commit') or '?'}): the allocator's peak {_gb(mem)} GB is "
                f"**{'within' if abs(rel) <= 0.15 else 'not within'} 15% of the {dev}-compiled prediction** "
                f"{_gb(d['predicted_peak'])} GB ({_pct(rel)}; the `{_device_row_label(m)}` row of the N = "
                f"{m['devices']} table)")
        if pred:
            crel = (mem - pred["predicted_peak"]) / pred["predicted_peak"]
            text += (f" and **{'within' if abs(crel) <= 0.15 else 'not within'} 15% of the CPU-compiled "
                     f"prediction** {_gb(pred['predicted_peak'])} GB ({_pct(crel)}; the CPU `{_step_label(m)}` row)")
        out.append(text + ".")
    return out


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def _validation_notes(m: dict, records: list[dict]) -> list[str]:
    """What one recorded run shows, computed from its JSON (so a rerun states its own)."""
    out = []
    run = f"{m['device_kind']} ({m.get('date', '?')}, jax {m.get('jax', '?')}, {m.get('commit') or '?'})"
    why = not_executed_reason(m)
    if why:
        out.append(f"{run}: executed peak **not measured**: {why}. Only the compiled program's memory is compared.")
    elif m.get("note"):
        out.append(f"{run}: {m['note'].rstrip('.')}.")
    comp, pred = m.get("compiled"), m.get("prediction")
    if comp:
        opts = m.get("compile_options") or {}
        out.append(f"The step compiled on the device in {m.get('compile_s', float('nan')):.0f} s"
                   + (f" ({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else "") + ".")
    cpu = _cpu_probe(records, m)
    if comp and cpu:
        parts = [(k, comp[k], cpu[k]) for k in ("argument", "output", "alias", "temp")]
        same = [k for k, g, c in parts[:3] if c and abs(g - c) <= 0.01 * c]
        text = ("Device vs CPU buffer assignment at b = {b}: ".format(b=m["per_device_batch"])
                + ", ".join(f"{k} {_gb(g)} vs {_gb(c)} GB" for k, g, c in parts) + ".")
        if len(same) == 3:
            text += (f" Arguments, outputs and aliased (donated) bytes agree to 1%: the whole difference is in the "
                     f"temporaries ({_pct((comp['temp'] - cpu['temp']) / cpu['temp'])}).")
        out.append(text)
    if comp and pred:
        rel = (comp["peak"] - pred["predicted_peak"]) / pred["predicted_peak"]
        text = (f"Compiled peak on the device {_gb(comp['peak'])} GB vs the CPU prediction "
                f"{_gb(pred['predicted_peak'])} GB: {_pct(rel)}")
        unread = m.get("state_not_read") or 0.0
        if unread:
            with_unread = (comp["peak"] + unread - pred["predicted_peak"]) / pred["predicted_peak"]
            text += (f" ({_gb(comp['peak'] + unread)} GB, {_pct(with_unread)}, with the {_gb(unread)} GB of state "
                     "the step does not read but the device holds)")
        if rel < -0.15:
            text += (". **The CPU-compiled table over-predicts this step's memory on the device by "
                     f"{-100 * rel:.0f}% of its prediction**, outside the 15% agreement asked for: the table is "
                     "conservative for GPUs (its batch limits are below what the GPU-compiled program allows). This "
                     "is the direction stated before the run (the CPU compiler computes bf16 ops in f32 and fuses "
                     "less); the run does not separate the two causes.")
        elif rel > 0.15:
            text += (". The CPU-compiled table under-predicts this step's memory on the device, outside the 15% "
                     "agreement asked for: its batch limits are too optimistic for GPUs.")
        else:
            text += ": within the 15% agreement asked for (compiled peaks)."
        out.append(text)
    if m.get("rel_diff") is not None:
        out.append(f"Allocator peak vs the CPU prediction: {_pct(m['rel_diff'])} "
                   f"({'within' if m.get('within_15pct') else 'not within'} 15%).")
    dpred = m.get("device_prediction")
    if dpred:
        probes = ", ".join(f"b = {p['per_device_batch']}: {_gb(p['peak'])} GB ({p['compile_s']:.0f} s)"
                           for p in m.get("device_probes", []) if "peak" in p)
        text = (f"Device-compiled prediction: the step compiled on the device (not run) at {probes}; fit "
                f"{_gb(dpred['fixed'])} + b x {_gb(dpred['per_example'])} GB, at b = {m['per_device_batch']} "
                f"({'inside' if dpred['interpolated'] else 'outside'} the probes) plus {_gb(dpred['state_not_read'])}"
                f" GB of state not read: {_gb(dpred['predicted_peak'])} GB")
        if m.get("device_rel_diff") is not None:
            text += (f"; the allocator's peak is {_pct(m['device_rel_diff'])} from it "
                     f"({'within' if m.get('device_within_15pct') else 'not within'} 15%)")
        out.append(text + ".")
    return out


def _validation_section(measured: list[dict], records: list[dict] = ()) -> list[str]:
    """## H200 validation: what --execute does and what to expect, then the recorded runs' table, summary and notes
    (and, while no run got to its steps, the proposal for the next call)."""
    lines = _validation_intro()
    if not measured:
        return lines + ["Not run yet.", ""]
    lines += ["| device | jax | step | b | steps run (s each) | peak_bytes_in_use | device compiled peak | "
              "CPU prediction (fixed + b x per ex.) | allocator vs prediction | within 15% | compiled vs prediction "
              "| device-compiled prediction | allocator vs it | run |", "|" + "---|" * 14]
    for m in sorted(measured, key=lambda m: (m.get("date", ""), executed_steps(m))):
        lines.append(_validation_row(m))
    lines.append("")
    summary = _validation_summary(measured)
    if summary:
        lines += [*summary, ""]
    for m in sorted(measured, key=lambda m: (m.get("date", ""), executed_steps(m))):
        lines += [f"- {t}" for t in _validation_notes(m, records)]
    lines.append("")
    if not any(executed_steps(m) for m in measured):  # only runs cut short before their steps
        lines += _next_call_lines(measured)
    return lines


def _validation_intro() -> list[str]:
    """The validation section's description of --execute, its command and the differences expected beforehand."""
    return ["## H200 validation: the MARVAL-B GSIM step run on one device", "",
            "`--execute` builds the N = 1 case's task, shardings and jit, compiles the step, makes the state on the",
            "device leaf by leaf (`marval_jax.benchmarks.random_init`: parameters, EMA and teacher N(0, 0.02^2) drawn",
            "on the host and copied onto their shardings, optimizer state zeros on the device; no initialiser is",
            "compiled), draws a fixed random batch and runs a few steps with the state donated. It compares the",
            "allocator's `peak_bytes_in_use` (`jax.devices()[0].memory_stats()`) with the N = 1 row's fixed + b x",
            "per_example at the run's batch (which equals the CPU probe's peak at b = 16), and reports the device",
            "compiler's own memory_analysis beside it. Agreement within 15% validates the table for GPUs. Its JSON",
            "is written before the compile and after every phase (`phase`: the one in progress), so a run cut short",
            "can still be recorded: its compiled peak is compared and its executed peak marked as not measured",
            "(`--note` says why). With `--device_probes 8,16` the step is first compiled (not run) on the device at",
            "those batches; their compiled peaks fitted as fixed + b x per_example, evaluated at the executed batch",
            "(32: outside the probes, so nothing of the executed program enters it) plus the state the device holds",
            "but the step does not read, make the device-compiled prediction, compared with the allocator's peak",
            "too. Command (on one H200, from the repository root, ~7 min: three compiles of ~2 min), then record",
            "its JSON here:", "",
            f"    {H200_COMMAND}", f"    {RECORD_COMMAND}", "",
            "Expected differences, stated before the run: the CPU compiler runs bf16 dots and elementwise ops in f32",
            "(so some bf16 activations get f32 copies) and fuses less than the GPU compiler, which points to a",
            "prediction above the GPU's compiled peak; the allocator's peak adds what the program does not own (the",
            "batch is counted in both; cuBLAS / autotuning workspace and allocator rounding are not in the",
            "prediction), and so do state leaves the step never reads: jit prunes them from the program (GSIM: the",
            "fake score's EMA copy, ema_decay 0; 0.83 GB for B, `state_not_read` in the JSON) but they stay",
            "allocated on the device. The command compiles without GEMM autotuning (`xla_gpu_autotune_level=0`, to",
            "keep the GPU compile short); autotuning chooses kernels and their workspace, not the program's buffers.",
            "The comparison is reported as it comes out.", ""]


def _validation_row(m: dict) -> str:
    """One recorded --execute run as a row of the validation table."""
    mem = (m.get("memory") or {}).get("peak_bytes_in_use")
    comp = (m.get("compiled") or {}).get("peak")
    pred = m.get("prediction")
    step = f"MARVAL-{_MODEL_LETTER.get(m['model'], m['model'])} {_step_label(m)}"
    rel = m.get("rel_diff")
    crel = (comp - pred["predicted_peak"]) / pred["predicted_peak"] if comp and pred else None
    ran = executed_steps(m)
    steps = f"{ran}: {', '.join(f'{t:.2f}' for t in m['step_s'])}" if ran else "none"
    if ran:
        peak = "n/a" if mem is None else _gb(mem)
    else:
        peak = "not measured"
    pred_s = ("n/a" if not pred else f"{_gb(pred['predicted_peak'])} ({_gb(pred['fixed'])} + "
              f"{m['per_device_batch']} x {_gb(pred['per_example'])})")
    dpred, drel = m.get("device_prediction"), m.get("device_rel_diff")
    dpred_s = ("n/a" if not dpred else f"{_gb(dpred['predicted_peak'])} ({_gb(dpred['fixed'])} + "
               f"{m['per_device_batch']} x {_gb(dpred['per_example'])} + {_gb(dpred['state_not_read'])}; "
               f"fit of b = {', '.join(map(str, dpred['probe_batches']))})")
    within = "within" if m.get("device_within_15pct") else "not within"
    drel_s = "n/a" if drel is None else f"{_pct(drel)} ({within} 15%)"
    return (
        f"| {m['device_kind']} x{m['devices']} | {m['jax']} | {step} | {m['per_device_batch']} | {steps} | "
        f"{peak} | {'n/a' if comp is None else _gb(comp)} | {pred_s} | "
        f"{'n/a' if rel is None else _pct(rel)} | "
        f"{'n/a' if rel is None else ('yes' if m.get('within_15pct') else 'no')} | "
        f"{'n/a' if crel is None else _pct(crel)} | {dpred_s} | {drel_s} | "
        f"{m.get('date', '?')}, {m.get('commit') or '?'} |")


def _next_call_lines(measured: list[dict]) -> list[str]:
    """The proposal for the next device call, while every recorded run ended before its steps."""
    compile_s = max((m.get("compile_s") or 0) for m in measured)
    state = max((m.get("state_total") or 0) for m in measured)
    return [
        "Next call (a proposal; no executed peak exists yet): rerun the command above with room for the steps.",
        f"The compile took {compile_s:.0f} s; the state ({_gb(state)} GB) is now made leaf by leaf with no",
        "compile (~25 s for MARVAL-B GSIM's on a shared 2-core CPU; the GPU host has 16 cores) instead of by a",
        "compiled `init_state`; the steps are not timed yet (MARVAL-B GSIM at b = 16: ~17 TFLOP per step by",
        "`benchmarks/flops.py`). A limit of 300 s around the command (e.g. `timeout 300`) should leave margin.",
        "Record it with `--record`: the allocator's peak then shows what the runtime adds to the compiled peak.",
        "If the gap to the CPU table stays outside 15%, the table could be made useful for GPUs by a",
        "GPU-calibrated column (the N = 1 case compiled on the GPU at the two probe batches and fitted there as",
        "fixed + b x per_example) or by a documented correction factor for the CPU rows, derived from several",
        "measured steps and batches rather than from this one point.", ""]


def _findings(records: list[dict]) -> list[str]:
    """Observations computed from the records (so a rerun states its own)."""
    out = []
    by = {(r["devices"], r["model"], r["step"], r.get("remat")): r for r in records}
    for (n, model, step, remat), r in sorted(by.items(), key=lambda kv: str(kv[0])):
        legacy = "commit" not in r
        if step == "mar" and (n, model, "mar_fix", None) in by:
            a, b = fit(r), fit(by[(n, model, "mar_fix", None)])
            if a and b and a[1] > 1.5 * b[1]:
                out.append(
                    f"N={n} {model}: the MAR step's per-example memory is {_gb(a[1])} GB as compiled "
                    f"({_code(r)}) and {_gb(b[1])} GB with the diffusion rows kept batch-sharded. "
                    + ("The MAR row predates the fix (5998cc3: `losses/mar_loss.diffusion_loss` makes one head call "
                       "per copy), which the `MAR, rows fix` row describes; recompile it with --recompile. "
                       if legacy else "")
                    + "A `jnp.tile(rows, (diffusion_batch_mul, 1))` of the head's rows cannot be sharded along the "
                    "batch-sharded axis, so each device runs the diffusion head on the global batch's rows (memory and "
                    "FLOPs grow with the device count).")
            elif a and b:
                out.append(f"N={n} {model}: the MAR step ({_code(r)}) and the `MAR, rows fix` candidate agree "
                           f"({_gb(a[1])} vs {_gb(b[1])} GB per example): the diffusion head's rows stay "
                           "batch-sharded (one head call per copy since 5998cc3).")
        ld = [p.get("leading_dims") for p in r.get("probes", []) if p.get("leading_dims")]
        replicated = bool(ld) and r["batch_shards"] > 1 and ld[0]["global"] > ld[0]["per_device"]
        if step == "rl" and (replicated or not ld):
            f = fit(r)
            est = f" (about {_gb(f[1] / r['batch_shards'])} GB per example once sharded, an estimate)" if f else ""
            out.append(
                f"N={n} {model} {_step_label(r)}: the step as compiled ({_code(r)}) is not batch-sharded"
                + (f" ({ld[0]['global']} arrays of the compiled program lead with the global batch, "
                   f"{ld[0]['per_device']} with the per-device batch)" if ld else "")
                + ": labels drawn inside the step with `jax.random.randint(key, batch['labels'].shape)` carry no "
                "batch sharding, so the whole trajectory (K AR iterations, VAE decode, reward) is replicated and "
                f"every device computes the global batch; `per ex.` is the cost of {r['batch_shards']} examples{est}."
                + (" The row predates the fix (5998cc3: `train/rl_task.py` derives the labels from the batch-sharded "
                   "input); recompile it with --recompile." if legacy else ""))
        elif step == "rl" and r["batch_shards"] > 1:
            f = fit(r)
            out.append(f"N={n} {model} {_step_label(r)} ({_code(r)}) is batch-sharded ({ld[0]['global']} arrays "
                       f"lead with the global batch, {ld[0]['per_device']} with the per-device batch)"
                       + (f": {_gb(f[1])} GB per example" if f else "") + ".")
        elif replicated:
            out.append(f"N={n} {model} {_step_label(r)}: {ld[0]['global']} arrays lead with the global batch vs "
                       f"{ld[0]['per_device']} with the per-device batch: part of the step is not batch-sharded.")
        if r["config_global_batch"] < r["batch_shards"]:
            out.append(f"N={n} {model} {_step_label(r)}: the config's global batch {r['config_global_batch']} is "
                       f"smaller than the {r['batch_shards']} batch shards; raise train.global_batch_size to a "
                       f"multiple of {r['batch_shards']} (or use fewer data x fsdp shards) to run it at this size.")
    return out


def _error_findings(records: list[dict]) -> list[str]:
    out = []
    for r in records:
        if "TraceContextError" in r.get("error", "") and r.get("step") == "rl" and r.get("remat") is False:
            text = (f"N={r['devices']} {r['model']} RL remat off did not trace as compiled ({_code(r)}): with "
                    "model.remat (large/huge configs) `models/transformer.run_blocks` applied `nnx.remat` to a block "
                    "merged outside the AR loop's `lax.scan` body (losses/rl.py closes over the parameters when "
                    "rl.remat is off), and flax refused to update its Params from the inner trace "
                    "(TraceContextError).")
            if "commit" not in r:
                text += (" Fixed since: run_blocks applies `jax.checkpoint` to a pure function of the block's "
                         "parameters (tests/losses/test_rl.py::test_block_remat_traces_and_keeps_the_gradients, "
                         "tests/models/test_transformer_remat.py); the case has not been recompiled.")
            out.append(text)
    return out
