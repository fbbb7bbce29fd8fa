"""marval_jax.tools.scale_check: the tool compiles a real train step on forced CPU devices (in its own subprocess)
and reports positive per-device memory that shrinks as the FSDP axis grows; `--execute` runs a step for real and
compares with the cached prediction; the memory model and report are checked on synthetic records."""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from marval_jax.tools import scale_check as sc

ROOT = pathlib.Path(__file__).resolve().parents[2]
GB = 1e9


def _env():
    """The suite's environment for the tool, with XLA_FLAGS less any forced device count (the tool forces its own).
    The suite's cheap LLVM flags (tests/conftest.py) stay: they change code generation, not buffer assignment, so
    the memory the tool reports is the same, and the prediction and the executed step are compiled alike."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "force_host_platform_device_count" not in f)
    return env


def _run_tool(tmp_path, fsdp):
    cache = tmp_path / f"fsdp{fsdp}.json"
    env = _env()
    proc = subprocess.run(
        [sys.executable, "-m", "marval_jax.tools.scale_check", "--devices", "8", "--models", "tiny", "--steps", "mar",
         "--mesh", f"data=-1,fsdp={fsdp},tensor=1", "--batches", "2", "--cache", str(cache),
         "--out", str(tmp_path / f"fsdp{fsdp}.md")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cached = json.loads(cache.read_text())
    (rec,) = [v for k, v in cached.items() if not k.startswith("_")]
    (command,) = cached["_commands"]  # the command is recorded with its cases, so the report can be re-rendered
    assert command.startswith("python -m marval_jax.tools.scale_check --devices 8")
    return rec, (tmp_path / f"fsdp{fsdp}.md").read_text()


def test_tiny_mar_step_memory_positive_and_shrinks_with_fsdp(tmp_path):
    dp, dp_md = _run_tool(tmp_path, 1)
    fsdp, _ = _run_tool(tmp_path, 8)
    assert dp["devices"] == fsdp["devices"] == 8
    assert dp["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1} and fsdp["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    for rec in (dp, fsdp):
        (probe,) = rec["probes"]
        assert probe["global_batch"] == 16 and probe["per_device_batch"] == 2
        assert probe["argument"] > 0 and probe["temp"] > 0 and probe["peak"] > 0
        assert rec["state"]["params"] > 0 and rec["state"]["optimizer"] > 0 and rec["state"]["ema"] > 0
        # Adam keeps two moments per parameter: optimizer state = 2 x params (+ the step counters)
        assert rec["state"]["optimizer"] == pytest.approx(2 * rec["state"]["params"], rel=0.01)
    # FSDP over 8 devices: state and compiled arguments per device shrink (the embed axis is split 8 ways)
    assert fsdp["state_total"] < 0.5 * dp["state_total"]
    assert fsdp["probes"][0]["argument"] < 0.5 * dp["probes"][0]["argument"]
    assert fsdp["probes"][0]["peak"] < dp["probes"][0]["peak"]
    # the compiled arguments are the state plus the batch: the shardings' bytes agree with the compiler's
    batch_bytes = 2 * (64 * 16 * 4 + 4)  # per device: 2 x (tokens (64, 16) f32 + label)
    assert dp["probes"][0]["argument"] == pytest.approx(dp["state_total"] + batch_bytes, rel=0.02)
    assert "| MAR-tiny | MAR |" in dp_md and "python -m marval_jax.tools.scale_check" in dp_md


def _record(step="gsim", fixed=10 * GB, per=2 * GB):
    probes = [dict(per_device_batch=b, global_batch=64 * b, peak=int(fixed + b * per), argument=int(fixed),
                   output=int(fixed), alias=int(fixed), temp=int(b * per), compile_s=1.0) for b in (2, 4)]
    return dict(devices=64, model="huge", step=step, remat=None, mesh={"data": 4, "fsdp": 16, "tensor": 1},
                batch_shards=64, config_global_batch=256,
                state=dict(params=1 * GB, optimizer=2 * GB, ema=1 * GB, frozen=1 * GB, other=0.0),
                state_total=5 * GB, frozen_args={}, probes=probes, config_mesh_state=None)


def test_linear_fit_and_max_batch():
    fixed, per = sc.fit(_record())
    assert fixed == pytest.approx(10 * GB) and per == pytest.approx(2 * GB)
    assert sc.max_batch(fixed, per, 95, 0.9) == int((0.9 * 95 - 10) // 2)  # 37
    assert sc.max_batch(fixed, per, 11, 0.9) == 0                          # fixed part alone does not fit
    assert sc.fit(dict(_record(), probes=_record()["probes"][:1])) is None


def test_render_table_and_parsers():
    text = sc.render([_record(), dict(_record("rl"), remat=True, rl_num_iter=64)], sc.parse_hbm("v5p=95,v5e=16"),
                     0.9, "python -m marval_jax.tools.scale_check --devices 64", "2026-11-29")
    assert "2026-11-29" in text and "peak(b) = fixed + b x per_example" in text
    assert "| MARVAL-H | GSIM | 1.00 | 2.00 | 1.00 | 1.00 | 5.00 | 10.00 | 2.00 |" in text
    assert "RL K=64 remat on" in text and "H200" in text
    gsim_row = next(l for l in text.splitlines() if l.startswith("| MARVAL-H | GSIM"))
    assert gsim_row.rstrip(" |").split(" | ")[-2:] == ["37", "2"]  # (0.9 x 16 - 10) // 2
    assert sc.parse_mesh("data=-1,fsdp=16") == {"data": -1, "fsdp": 16, "tensor": 1}
    assert sc.parse_mesh("config") is None
    with pytest.raises(ValueError, match="data=D"):
        sc.parse_mesh("dp=4")
    with pytest.raises(ValueError, match="unknown"):
        sc.parse_list("mar,bogus", sc.STEPS, "steps")


def _tool(*args, timeout=900, cwd=ROOT):
    env = _env()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "marval_jax.tools.scale_check", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_execute_runs_the_step_and_compares_with_the_cpu_prediction(tmp_path):
    """The H200 validation path at tiny size on CPU: compile N = 1 at two batches (the prediction), run the step for
    real at one of them, record the result in the report. On CPU the device compiler is the one that made the
    prediction, so its compiled peak matches it; CPU keeps no allocator statistics (peak n/a). Without --out the
    JSON goes to the working directory under the case's name, written before the compile and after every phase."""
    cache, report = tmp_path / "scale.json", tmp_path / "scale.md"
    result = tmp_path / sc.default_execute_out("tiny", "gsim", 4)
    common = ["--devices", "1", "--models", "tiny", "--steps", "gsim", "--mesh", "data=1,fsdp=1,tensor=1",
              "--batches", "2,4"]
    _tool(*common, "--cache", str(cache), "--out", str(report))
    proc = _tool("--execute", *common, "--execute_batch", "4", "--execute_steps", "3", "--cache", str(cache),
                 "--compile_options", "xla_no_such_option_zz=1", "--device_probes", "1,2", cwd=tmp_path)
    assert f"writing {result.name}" in proc.stderr
    rec = json.loads(result.read_text())
    assert rec["phase"] == "done" and rec["command"].startswith("python -m marval_jax.tools.scale_check --execute")
    started = rec["phase_started_s"]
    assert sorted(started, key=started.get) == ["probe b=1", "probe b=2", "compile", "init", "step 1/3",
                                                 "step 2/3", "step 3/3"]
    assert started["compile"] <= started["init"] <= started["step 1/3"]
    # the device-compiled prediction: the step compiled on this backend at b = 1, 2 (not run), fitted, evaluated
    # at the executed b = 4 outside the probes, plus the state the device holds but the step does not read
    assert [p["per_device_batch"] for p in rec["device_probes"]] == [1, 2]
    dpred = rec["device_prediction"]
    assert dpred["probe_batches"] == [1, 2] and not dpred["interpolated"]
    p1, p2 = (p["peak"] for p in rec["device_probes"])
    assert dpred["per_example"] == pytest.approx(p2 - p1) and dpred["state_not_read"] == rec["state_not_read"]
    assert dpred["predicted_peak"] == pytest.approx(p1 + 3 * (p2 - p1) + rec["state_not_read"])  # b = 4
    assert dpred["predicted_peak"] - dpred["state_not_read"] == pytest.approx(rec["compiled"]["peak"], rel=0.1)
    assert "no compiled initialiser" in rec["init"] and rec["init_s"] < 60
    assert "No such compile option" in rec["compile_options_error"] and rec["compile_options"] == {}  # fell back
    assert rec["mode"] == "execute" and rec["platform"] == "cpu" and rec["per_device_batch"] == 4
    assert len(rec["step_s"]) == 3 and all(math.isfinite(x) for x in rec["loss"])
    assert rec["memory"] is None and "rel_diff" not in rec          # CPU: no memory_stats
    pred = rec["prediction"]
    assert pred["key"] == "n=1|mesh=data=1,fsdp=1,tensor=1|tiny|gsim|b=2,4"
    assert pred["predicted_peak"] == pytest.approx(pred["probe_peak"], rel=1e-9)  # b = 4 is a probe
    assert rec["compiled"]["peak"] == pytest.approx(pred["predicted_peak"], rel=0.02)
    assert abs(rec["compiled_rel_diff"]) < 0.02
    # jit prunes state the step never reads (the fake score's EMA copy: its ema_decay is 0): one params copy
    assert rec["state_not_read"] == pytest.approx(rec["state"]["frozen"], rel=0.01)
    assert "[scale_check --execute] cpu x1 tiny gsim b=4 (3 steps): peak_bytes_in_use n/a" in proc.stdout
    _tool("--record", str(result), "--cache", str(cache), "--out", str(report))
    text = report.read_text()
    assert "## N = 1 device (one H200; mesh data=1,fsdp=1,tensor=1)" in text
    assert "| cpu x1 | " in text and "MARVAL-tiny GSIM | 4 | 3: " in text and "Not run yet." not in text
    assert "Device-compiled prediction: the step compiled on the device (not run) at b = 1: " in text
    assert "fit of b = 1, 2)" in text
    assert sc.H200_COMMAND in text and "**not measured**" not in text and "Next call" not in text


def test_find_prediction_and_execute_summary():
    rec = dict(_record(), devices=1, mesh={"data": 1, "fsdp": 1, "tensor": 1}, batch_shards=1)
    cache = {"_commands": {}, "n=1|x|b=2,4": rec, "n=1|y|b=2,4": dict(rec, model="base"),
             "bad": dict(rec, error="exit 1")}
    pred = sc.find_prediction(cache, 1, {"data": 1, "fsdp": 1, "tensor": 1}, "huge", "gsim", None, 16, [2, 4])
    assert pred["key"] == "n=1|x|b=2,4" and pred["predicted_peak"] == pytest.approx(10 * GB + 16 * 2 * GB)
    assert pred["probe_peak"] is None
    assert sc.find_prediction(cache, 1, {"data": 1, "fsdp": 1, "tensor": 1}, "large", "gsim", None, 16) is None
    m = dict(mode="execute", device_kind="NVIDIA H200", devices=1, model="huge", step="gsim", per_device_batch=16,
             step_s=[1.0, 0.5, 0.5], memory={"peak_bytes_in_use": int(46 * GB)}, compiled={"peak": int(40 * GB)},
             prediction=pred, rel_diff=(46 - 42) / 42, within_15pct=True, compiled_rel_diff=(40 - 42) / 42)
    line = sc.execute_summary(m)
    assert "NVIDIA H200 x1 huge gsim b=16 (3 steps): peak_bytes_in_use 46.00 GB" in line
    assert "CPU prediction 42.00 GB" in line and "+9.5% (within 15%)" in line and "compiled vs prediction -4.8%" in line


def test_parse_options():
    assert sc.parse_options("xla_gpu_autotune_level=0, a=true,b=0.5,c=x") == {
        "xla_gpu_autotune_level": 0, "a": True, "b": 0.5, "c": "x"}
    assert sc.parse_options("") == {}
    with pytest.raises(ValueError, match="name=value"):
        sc.parse_options("xla_gpu_autotune_level")


def test_command_key_and_findings_state_the_code_they_describe():
    assert sc._command_key(["--devices", "1", "--date", "2026-01-01", "--report_only", "--recompile"]) == (
        "python -m marval_jax.tools.scale_check --devices 1")
    legacy_mar = dict(_record("mar", per=7 * GB))
    fix = dict(_record("mar_fix", per=1 * GB))
    text = " ".join(sc._findings([legacy_mar, fix]))
    assert "predates the fix" in text and sc.LEGACY in text
    now = " ".join(sc._findings([dict(_record("mar", per=1.05 * GB), commit="abc1234"), fix]))
    assert "agree" in now and "predates" not in now
    err = dict(devices=64, model="huge", step="rl", remat=False,
               error="exit 1: flax.errors.TraceContextError: Cannot mutate Param from a different trace level")
    (f,) = sc._error_findings([err])
    assert "Fixed since" in f
    assert "Fixed since" not in sc._error_findings([dict(err, commit="abc1234")])[0]


def test_a_run_cut_short_after_its_compile_is_recorded_with_its_compiled_peak(tmp_path):
    """The H200 run of 2026-11-29 in miniature: the step compiled (memory_analysis in the JSON), then the run was
    killed before any step; --record compares the compiled peak, marks the executed peak as not measured (with the
    --note and what the JSON shows) and says what the next call should do."""
    mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    case = dict(_record(), devices=1, model="base", mesh=mesh, batch_shards=1, config_global_batch=512)
    case["probes"] = [dict(p, per_device_batch=b, global_batch=b, argument=int(6.65 * GB), output=int(7.49 * GB),
                           alias=int(6.65 * GB), temp=int(t * GB), peak=int((6.65 + 7.49 - 6.65 + t) * GB))
                      for p, b, t in zip(case["probes"], (8, 16), (12.0, 24.25))]
    key = sc.case_key(1, mesh, "base", "gsim", None, [8, 16])
    cache = tmp_path / "scale.json"
    cache.write_text(json.dumps({"_commands": {"python -m marval_jax.tools.scale_check --devices 1": {
        "date": "2026-11-29", "cases": [[key, "N=1 base gsim"]]}}, key: case}))
    pred = sc.find_prediction(json.loads(cache.read_text()), 1, mesh, "base", "gsim", None, 16, [8, 16])
    run = dict(mode="execute", device_kind="NVIDIA H200", devices=1, model="base", step="gsim", remat=None,
               mesh=mesh, per_device_batch=16, num_steps=3, jax="0.11.2", date="2026-11-29", commit="abc1234",
               compile_s=94.8, compile_options={"xla_gpu_autotune_level": 0}, prediction=pred,
               compiled=dict(argument=int(6.65 * GB), output=int(7.49 * GB), alias=int(6.65 * GB),
                             temp=int(12.32 * GB), peak=int(19.81 * GB)),
               state_not_read=0.83 * GB)  # no phase, init_s, step_s or memory: written before those
    path = tmp_path / "h200_gsim.json"
    path.write_text(json.dumps(run))
    assert sc.not_executed_reason(run) == (
        "the run ended after the step's compile, before the state was initialised and any step ran")
    report = tmp_path / "scale.md"
    assert sc.main(["--record", str(path), "--note", "killed by an outer timeout 130", "--cache", str(cache),
                    "--out", str(report)]) == 0
    text = report.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| NVIDIA H200 x1 |"))
    assert "| 16 | none | not measured | 19.81 | 31.74 (7.24 + 16 x 1.53) | n/a | n/a | -37.6% |" in row
    assert ("executed peak **not measured**: killed by an outer timeout 130; the run ended after the step's "
            "compile") in text
    assert "the whole difference is in the temporaries (-49.2%)" in text
    assert "over-predicts this step's memory on the device by 38%" in text and "conservative for GPUs" in text
    assert "Next call" in text and "correction factor" in text
    measured = json.loads(cache.read_text())["_measured"]
    assert list(measured) == ["NVIDIA H200|n=1|base|gsim|b=16|2026-11-29|compile-only"]


def test_device_compiled_row_is_the_fit_of_the_device_probes():
    """A recorded --execute run with --device_probes adds a row to its N section beside the CPU-compiled one: fixed
    (with the state the device holds but the step does not read) and per example from the device's compiled peaks,
    the batch limits from that fit; the newest run per device and case is the one shown; the validation section
    says which prediction the allocator's peak is within 15% of."""
    mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    case = dict(_record(), devices=1, model="base", mesh=mesh, batch_shards=1, config_global_batch=512)  # 10 + 2b
    key = sc.case_key(1, mesh, "base", "gsim", None, [2, 4])
    pred = sc.find_prediction({key: case}, 1, mesh, "base", "gsim", None, 8, [2, 4])  # CPU: 10 + 8 x 2 = 26 GB

    def run(date, peaks, allocator, **kw):
        probes = [dict(per_device_batch=b, peak=int(p * GB), compile_s=1.0) for b, p in zip((2, 4), peaks)]
        return dict(**kw, mode="execute", device_kind="NVIDIA H200", devices=1, model="base", step="gsim", remat=None,
                    mesh=mesh, per_device_batch=8, jax="0.11.2", date=date, commit="abc1234", prediction=pred,
                    platform="gpu",
                    device_probes=probes, state_not_read=1 * GB, state=case["state"], state_total=case["state_total"],
                    step_s=[1.0, 0.5], memory={"peak_bytes_in_use": int(allocator * GB)},
                    rel_diff=(allocator - 26) / 26)
    old = run("2026-11-28", (20, 30), 20)                        # allocator vs the CPU prediction: -23.1%
    new = run("2026-11-29", (13, 14), 16.5, compiled={"peak": int(16 * GB)})  # -36.5%, compiled -38.5%
    # the newest run's device fit: 12 + 0.5 b; + 1 GB not read: 17 GB at b = 8
    assert sc.device_prediction(new)["predicted_peak"] == pytest.approx(17 * GB)
    text = sc.render([case], sc.parse_hbm("v5p=95,v5e=16,h200=141"), 0.9, "python -m marval_jax.tools.scale_check",
                     "2026-11-29", measured=[old, new])
    rows = [l for l in text.splitlines() if l.startswith("| MARVAL-B | GSIM")]
    assert len(rows) == 2 and rows[0].startswith("| MARVAL-B | GSIM | ")  # the CPU row first, one device row
    cells = rows[1].strip("| ").split(" | ")
    assert cells[1] == "GSIM, H200-compiled (b=2,4)"
    assert cells[2:7] == ["1.00", "2.00", "1.00", "1.00", "5.00"]         # the run's state
    assert cells[7:10] == ["13.00", "0.5", "2: 13.00, 4: 14.00"]          # 12 + 1 not read; the probes' peaks
    assert cells[10] == "512"
    # (0.9 x 141 - 13) // 0.5 = 227, in the device's own column only (the TPUs' compilers lay it out differently);
    # the CPU fit gives 58, the same fit without the unread state 229, the older run's (10 + 1 GB, 5 GB per ex.) 23
    assert cells[11:] == ["-", "-", "227"]
    cpu_cells = rows[0].strip("| ").split(" | ")
    assert cpu_cells[7:9] == ["10.00", "2.00"] and cpu_cells[11:] == ["37", "2", "58"]
    assert ("The CPU-compiled rows are upper bounds on GPUs: XLA's CPU compiler holds the bf16 activations at "
            "near-f32 size, and the H200 runs recorded in `H200 validation` peak 23% to 38% below their CPU "
            "prediction") in text
    assert ("The `GSIM, H200-compiled (b=2,4)` row fits the step compiled on the H200 (not run) at b = 2, 4; its "
            "`fixed` includes the 1.00 GB") in text
    assert "fills only the H200's HBM column" in text
    assert "17.00 GB at b = 8, the allocator's peak 16.50 GB is -2.9% from it (within 15%)" in text
    assert ("the allocator's peak 16.50 GB is **within 15% of the H200-compiled prediction** 17.00 GB (-2.9%; the "
            "`GSIM, H200-compiled (b=2,4)` row of the N = 1 table) and **not within 15% of the CPU-compiled "
            "prediction** 26.00 GB (-36.5%; the CPU `GSIM` row)") in text
