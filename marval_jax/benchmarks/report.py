"""The benchmark suite's report: the markdown tables of a JSON report (`render_markdown`, written between markers by
`write_table`), with the issue's targets and the PyTorch reference beside the rows, and `merge_reports` (several
runs' reports as one)."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from marval_jax.benchmarks.defaults import TRAIN_STEPS
from marval_jax.benchmarks.flops import BLOCK_PARTS

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
    """The generated block of docs/benchmarks.md: a header (device, versions, peaks), then one table per family of
    rows present in the report (sampling, training steps, KV cache, sampler breakdown, transformer block)."""
    res = report["results"]
    samp = [e for e in res if e["name"].startswith("sample/")]
    train = [e for e in res if e["name"].startswith("train/")]
    kv = [e for e in res if e["name"].startswith("kv/")]
    brk = [e for e in res if e["name"].startswith("breakdown/")]
    blk = [e for e in res if e["name"].startswith("block/")]
    rem = [e for e in res if e["name"].startswith("remat/")]
    lines = _header_lines(report)
    if samp:
        lines += _sampling_lines(samp)
    if train:
        lines += _training_lines(train)
    if kv:
        lines += _kv_lines(report, kv)
    if brk:
        lines += _breakdown_lines(report, brk, samp)
    if blk:
        lines += _block_lines(blk)
    if rem:
        lines += _remat_lines(rem)
    lines.append(END)
    return "\n".join(lines)


def _header_lines(report: dict) -> list[str]:
    """The block's first marker and the run's header paragraph."""
    peaks = report.get("peaks", {})
    dev = report["device"]
    return [BEGIN, "",
            f"Measured {report['date'][:10]} on **{dev['kind']}** ({dev['platform']}, {dev['count']} device(s)), "
            f"jax {report['versions'].get('jax')}, flax {report['versions'].get('flax')}; suite wall time "
            f"{_fmt(report.get('total_s'), '.0f', ' s')}. MFU = analytic matmul FLOPs / time / peak, against the "
            f"dense bf16 peak ({_fmt(peaks.get('bf16_dense_peak_tflops'), '.0f')} TFLOP/s) and the measured bf16 "
            f"matmul rate ({_fmt(peaks.get('matmul_reference_tflops'), '.0f')} TFLOP/s; this run measured "
            f"{_fmt(peaks.get('matmul_measured_tflops'), '.0f')} TFLOP/s on an 8192^3 product). "
            "Memory = XLA's buffer assignment of the program (arguments + outputs + temporaries).", ""]


def _sampling_lines(samp: list[dict]) -> list[str]:
    """### Sampling: the sample/* rows, with targets and the PyTorch reference."""
    lines = ["### Sampling", "",
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
    return lines


def _training_lines(train: list[dict]) -> list[str]:
    """### Training steps: the train/* rows, and a line for each step not measured."""
    lines = ["### Training steps", "",
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

    return lines


def _remat_lines(rem: list[dict]) -> list[str]:
    """### Remat policies: MAR's training step under each model.remat_policy (the remat/mar/* rows)."""
    lines = ["### Remat policies (MAR training step)", "",
             "| model | remat_policy | batch | s / step | images / s | compile s | temp GiB | program GiB | "
             "allocator peak GiB | TFLOP / step | MFU (peak) | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in rem:
        mem = (e.get("compile") or {}).get("memory") or {}
        temp = mem.get("temp_size_in_bytes")
        policy = e["name"].split("/")[-1]
        if e.get("remat_blocks", -1) != -1:  # model.remat_blocks: the policy on the first N blocks of each stack
            policy += f" ({e['remat_blocks']} blocks)"
        lines.append(f"| {e['model']} | {policy} | {e.get('batch')} | "
                     f"{_fmt(e.get('time_s'), '.3f')} | {_fmt(e.get('images_per_s'), '.0f')} | "
                     f"{_fmt((e.get('compile') or {}).get('total_s'), '.1f')} | "
                     f"{_fmt(temp / 2 ** 30 if temp is not None else None, '.2f')} | {_gib(e)} | {_alloc_gib(e)} | "
                     f"{_fmt((e.get('flops') or 0) / 1e12 if e.get('flops') else None, '.1f')} | "
                     f"{_fmt(e.get('mfu_peak'), '.1%')} | {_status(e, '')} |")
    lines += ["", "Temp GiB: the temporaries of XLA's buffer assignment of the compiled step (activations kept for "
              "the backward pass among them); program GiB adds arguments and outputs. FLOPs count the matmuls "
              "each policy recomputes (benchmarks/flops.py `mar_train_flops`).", ""]
    return lines


def _kv_lines(report: dict, kv: list[dict]) -> list[str]:
    """### KV cache: the kv/* rows with their baselines' times and the speed-ups."""
    lines = ["### KV cache", "",
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
    return lines


def _breakdown_lines(report: dict, brk: list[dict], samp: list[dict]) -> list[str]:
    """### Where the sampler time goes: the breakdown/* rows and, per sampler row, the rest (sampler - both loops)."""
    lines = ["### Where the sampler time goes", "",
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
    return lines


def _block_lines(blk: list[dict]) -> list[str]:
    """### Where a transformer block's time goes: the block/* rows, grouped by model and batch."""
    lines = ["### Where a transformer block's time goes", "",
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
    for model, batch in groups:
        lines += _block_group_lines(model, batch,
                                    [e for e in blk if e["model"] == model and e.get("batch") == batch])
    lines.append("")
    return lines


def _block_ms(e: dict | None) -> float | None:
    """A block/* row's milliseconds per call of its part (None if not measured)."""
    return None if e is None or e.get("time_per_call_s") is None else 1e3 * e["time_per_call_s"]


def _block_group_lines(model: str, batch, rows: list[dict]) -> list[str]:
    """The block table's rows of one model and batch: one per part (measured, failed or missing), then the rest."""
    lines: list[str] = []
    by: dict[str, dict] = {}
    for e in rows:  # a measured row wins over a skipped or failed one of the same part
        part = e["name"][len("block/"):]
        if part not in by or e["status"] == "ok" or by[part]["status"] != "ok":
            by[part] = e
    t_len = next((e["seq_len"] for e in rows if e.get("seq_len")), None)
    full = _block_ms(by.get("full")) if (by.get("full") or {}).get("status") == "ok" else None
    for part in BLOCK_PARTS:
        e = by.get(part)
        label = part.replace("_", " ")
        if e is None:
            lines.append(f"| {model} | {label} | {batch} | {_fmt(t_len, 'd')} | - | - | - | - | - | - | "
                         "not yet measured |")
            continue
        t = _block_ms(e) if e["status"] == "ok" else None
        share = t / full if t is not None and full else None
        lines.append(f"| {model} | {label} | {batch} | {_fmt(e.get('seq_len') or t_len, 'd')} | "
                     f"{_fmt(e.get('calls'), 'd')} | {_fmt(t, '.3f')} | {_fmt(share, '.0%')} | "
                     f"{_fmt(e.get('tflops_per_s'), '.0f')} | {_fmt(e.get('mfu_peak'), '.1%')} | "
                     f"{_fmt(e.get('max_rel_diff_vs_attention_core'), '.2e')} | "
                     f"{_status(e, '') if e['status'] != 'error' else 'error: ' + _short_error(e)} |")
    parts = [_block_ms(by[p]) if (by.get(p) or {}).get("status") == "ok" else None
             for p in ("full_xla", "matmuls", "attention_core")]
    if None not in parts:
        rest = parts[0] - parts[1] - parts[2]
        lines.append(f"| {model} | rest (full xla - matmuls - attention core) | {batch} | {_fmt(t_len, 'd')} | "
                     f"| {rest:.3f} | {rest / parts[0]:.0%} | | | | |")
    return lines


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



def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)

