"""The benchmark suite (marval_jax/benchmarks: runner, model_bench, report). What CI compiles: one `--quick` run
(tiny shapes, CPU, one subprocess) over one row per distinct measurement code path (`COMPILED`: the uncached
sampler, the MAR / GSIM / RL training steps, the three KV-cache variants, both breakdown loops) and every block/*
part. What it does not compile: sample/teacher, train/rl_noremat, kv/teacher/* and breakdown/onestep/* run the same
functions with another sampler kind or rl.remat off; they are checked by `--plan`, which walks the same priority loop
without compiling (every row present, in order), and the tiny --quick run is tied to that plan (its rows are the
plan's rows that --rows selects, in the plan's order). The out-of-memory fallback, the time budget, the RL pairing and
the tables are checked with stand-in measurements (no compilation)."""
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import jax
import pytest

from marval_jax.benchmarks import __main__ as cli
from marval_jax.benchmarks import defaults
from marval_jax.benchmarks import flops as F
from marval_jax.benchmarks import suite
from marval_jax.user_errors import EXIT_USER_ERROR, UserError, call_cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROWS = {"sample/teacher", "sample/onestep", "train/mar", "train/gsim", "train/rl", "train/rl_noremat",
        "kv/onestep/approx", "kv/onestep/causal", "kv/onestep/causal_exact",
        "kv/teacher/approx", "kv/teacher/causal", "kv/teacher/causal_exact",
        "breakdown/teacher/transformer_loop", "breakdown/teacher/head_loop",
        "breakdown/onestep/transformer_loop", "breakdown/onestep/head_loop"}
# One row per distinct code path of ModelBench (the teacher breakdown: the CFG branch and the teacher's head chain).
COMPILED = ("sample/onestep", "train/mar", "train/gsim", "train/rl", "kv/onestep/approx", "kv/onestep/causal",
            "kv/onestep/causal_exact", "breakdown/teacher/transformer_loop", "breakdown/teacher/head_loop")
BLOCK_ROWS = [f"block/{p}" for p in F.BLOCK_PARTS]
REMAT_COMPILED = ["remat/mar/full"]  # the remat/* rows share train_mar; "full" rematerialises blocks and head


def run_quick(tmp, *args: str) -> tuple[dict, str]:
    """`python -m marval_jax.benchmarks --quick` (tiny shapes, CPU) in a fresh process (--quick sets XLA_FLAGS before
    jax is imported): its JSON report and rendered table."""
    out, table = tmp / "q.json", tmp / "q.md"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "marval_jax.benchmarks", "--quick", "--out", str(out),
                           "--table", str(table), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), table.read_text()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `--quick` run over the COMPILED rows and the block parts, shared by the tests below."""
    return run_quick(tmp_path_factory.mktemp("quick"), "--what", ",".join(defaults.WHAT),
                     "--rows", ",".join(COMPILED + tuple(REMAT_COMPILED)) + ",block/*")


def plan(tmp_path, *args: str) -> dict:
    """`--quick --plan` in this process: the rows in the order the suite would run them, nothing compiled."""
    out = tmp_path / "plan.json"
    assert cli.main(["--quick", "--plan", "--out", str(out), *args]) == 0
    return json.loads(out.read_text())


def test_plan_lists_every_row_in_priority_order(tmp_path):
    report = plan(tmp_path)
    names = [r["name"] for r in report["results"]]
    assert len(names) == len(set(names)) and set(names) == ROWS == set(suite.row_names(defaults.DEFAULT_WHAT))
    assert all(r["status"] == "planned" and r["need_s"] > 0 and "compile" not in r for r in report["results"])
    assert report["planned_s"] == pytest.approx(sum(r["need_s"] for r in report["results"]), abs=0.1 * len(names))
    # priority order: the Speed targets, then RL, then the KV cache, then the breakdown
    first = {n: names.index(n) for n in ROWS}
    assert first["sample/onestep"] < first["train/mar"] < first["train/gsim"] < first["train/rl"]
    assert first["train/rl"] < first["train/rl_noremat"] < first["kv/onestep/approx"]
    assert max(first[n] for n in ROWS if n.startswith("kv/")) < first["breakdown/teacher/transformer_loop"]
    # --rows: only the matching rows, in the same order, the others not recorded at all
    kv = [r["name"] for r in plan(tmp_path, "--rows", "kv/onestep/*,sample/onestep")["results"]]
    assert kv == ["sample/onestep", "kv/onestep/approx", "kv/onestep/causal", "kv/onestep/causal_exact"]
    # a budget is spent by the planned rows' estimates: the rows past it are planned as skipped
    budget = report["results"][0]["need_s"] + report["results"][1]["need_s"] + 1.0
    tight = plan(tmp_path, "--time-budget", str(budget))["results"]
    assert [r["status"] for r in tight[:2]] == ["planned", "planned"]
    assert {r["status"] for r in tight[2:]} == {"skipped"}


def test_quick_run_is_the_selected_part_of_the_plan(quick, tmp_path):
    report, _ = quick
    results = report["results"]
    names = [r["name"] for r in results]
    planned = plan(tmp_path, "--what", ",".join(defaults.WHAT), "--rows",
                   ",".join(COMPILED + tuple(REMAT_COMPILED)) + ",block/*")
    assert names == [r["name"] for r in planned["results"]] == list(COMPILED) + BLOCK_ROWS + REMAT_COMPILED
    assert all(r["status"] == "ok" for r in results), [(r["name"], r.get("error")) for r in results
                                                       if r["status"] != "ok"]
    assert all(r["time_s"] > 0 and r["flops"] > 0 and r["compile"]["total_s"] > 0 for r in results)


def test_quick_run_rl_and_gsim(quick):
    report, table = quick
    rl = next(r for r in report["results"] if r["name"] == "train/rl")
    assert rl["settings"]["remat"] is True and rl["batch"] == report["settings"]["rl_batch"]
    # the loop the flops below count: --quick's one bucket, one compiled body (SamplerSpec's default 4 gives 2)
    assert rl["settings"]["num_buckets"] == report["settings"]["num_buckets"] == 1
    assert rl["settings"]["plan_pieces"] == 1
    # compiled program's memory, plus the allocator's when the backend reports it
    assert rl["compile"]["memory"]["program_peak_bytes"] > 0 and "device_memory_after" in rl
    # the forward pass recomputed by remat is counted (train/rl_noremat's count, not compiled here)
    cfg = suite.model_config("tiny")
    kw = dict(batch=2, num_iter=2, num_buckets=1)
    assert rl["flops"] == F.rl_step_flops(cfg, remat=True, **kw)["total"] > F.rl_step_flops(cfg, remat=False,
                                                                                              **kw)["total"]
    gsim = next(r for r in report["results"] if r["name"] == "train/gsim")
    assert gsim["tflops_per_s"] > 0 and "mfu_peak" in gsim  # MFU against the device's peak (None on CPU)
    assert "| tiny | rl, remat on | 2 |" in table and "| - | rl, remat off | - |" in table


def test_quick_run_kv_rows(quick):
    report, table = quick
    by = {r["name"]: r for r in report["results"]}
    approx, causal, exact = (by[f"kv/onestep/{v}"] for v in ("approx", "causal", "causal_exact"))
    assert approx["baseline"] == "sample/onestep" and exact["baseline"] == "kv/onestep/causal"
    assert approx["attention"] == "bidirectional" and exact["attention"] == causal["attention"] == "causal"
    assert approx["cache"] == "approx r=2 R=4" and exact["cache"] == "exact" and causal["cache"] == "none"
    for r in (approx, causal, exact):
        assert r["speedup"] == pytest.approx(by[r["baseline"]]["time_s"] / r["time_s"])
        assert r["output_finite_fraction"] == 1.0
    for r in (approx, exact):  # outputs on the same key as the baseline, compared
        assert 0 <= r["max_rel_diff_vs_baseline"] < float("inf")
    assert "### KV cache" in table and "| tiny | onestep | causal | exact | 2 |" in table
    assert "| kv/onestep/causal |" in table and table.count("x |") >= 3


def test_remat_rows_one_per_policy(tmp_path):
    """--what remat plans MAR's training step once per model.remat_policy, after everything else."""
    from marval_jax.models.transformer import REMAT_POLICIES
    assert defaults.REMAT_ROWS == REMAT_POLICIES and "remat" not in defaults.DEFAULT_WHAT
    names = [r["name"] for r in plan(tmp_path, "--what", "train,remat", "--train-steps", "mar")["results"]]
    assert names == ["train/mar"] + [f"remat/mar/{p}" for p in REMAT_POLICIES]


def test_scan_blocks_flag_sets_every_rows_model(tmp_path):
    """--scan-blocks: every row's model with scan_blocks (recorded in the report's model_configs)."""
    assert plan(tmp_path, "--rows", "sample/onestep")["model_configs"]["tiny"]["scan_blocks"] is False
    assert plan(tmp_path, "--rows", "sample/onestep", "--scan-blocks")["model_configs"]["tiny"]["scan_blocks"] is True


def test_num_buckets_flag_sets_the_loops_buckets_and_is_checked(tmp_path):
    """--num-buckets: the AR loops' encoder-length buckets (samplers and the RL step; --quick's default is 1)."""
    assert plan(tmp_path, "--rows", "train/rl")["settings"]["num_buckets"] == 1
    assert plan(tmp_path, "--rows", "train/rl", "--num-buckets", "2")["settings"]["num_buckets"] == 2
    with pytest.raises(UserError, match="--num-buckets takes a positive integer"):
        cli.main(["--quick", "--plan", "--num-buckets", "0", "--out", str(tmp_path / "x.json")])


def test_remat_blocks_flag_sets_every_rows_model_and_is_checked(tmp_path):
    """--remat-blocks N: every row's model.remat_blocks (recorded in model_configs); below -1 one error line."""
    assert plan(tmp_path, "--rows", "sample/onestep")["model_configs"]["tiny"]["remat_blocks"] == -1
    assert plan(tmp_path, "--rows", "sample/onestep", "--remat-blocks", "2")["model_configs"]["tiny"]["remat_blocks"] == 2
    with pytest.raises(UserError, match="--remat-blocks takes N >= 0 or -1"):
        cli.main(["--quick", "--plan", "--remat-blocks", "-2", "--out", str(tmp_path / "x.json")])


def test_remat_table_names_a_partial_policy():
    from marval_jax.benchmarks.report import _remat_lines
    rows = [{"model": "base", "name": "remat/mar/dots_saveable", "batch": 128, "remat_blocks": 4, "status": "ok"},
            {"model": "base", "name": "remat/mar/per_block", "batch": 128, "status": "ok"}]
    lines = _remat_lines(rows)
    assert any(line.startswith("| base | dots_saveable (4 blocks) | 128 |") for line in lines)
    assert any(line.startswith("| base | per_block | 128 |") for line in lines)


def test_quick_remat_row(quick):
    """A remat/* row is MAR's training step with the policy set: its recomputed matmuls counted, the compiled
    program's temporaries recorded and shown in their table."""
    import dataclasses
    report, table = quick
    row = next(r for r in report["results"] if r["name"] == "remat/mar/full")
    assert row["remat_policy"] == row["settings"]["remat_policy"] == "full" and row["finite_loss"]
    cfg = suite.model_config("tiny")
    assert row["flops"] == F.mar_train_flops(dataclasses.replace(cfg, remat_policy="full"), batch=2)["total"] \
        > F.mar_train_flops(cfg, batch=2)["total"]
    assert row["compile"]["memory"]["temp_size_in_bytes"] > 0
    assert "### Remat policies" in table and "| tiny | full | 2 |" in table


def test_quick_block_rows(quick):
    """The block parts on tiny shapes: every part measured, FLOPs against XLA's count, the fused core's error, the
    table."""
    report, table = quick
    rows = {r["name"]: r for r in report["results"] if r["name"].startswith("block/")}
    assert list(rows) == BLOCK_ROWS
    assert all(r["status"] == "ok" for r in rows.values()), [(n, r.get("error")) for n, r in rows.items()
                                                             if r["status"] != "ok"]
    cfg = suite.model_config("tiny")
    t, d = cfg.buffer_size + cfg.seq_len, cfg.decoder_embed_dim
    for part in F.BLOCK_PARTS:
        r = rows[f"block/{part}"]
        assert (r["batch"], r["seq_len"], r["calls"]) == (2, t, 2)
        assert r["flops_per_call"] == 2 * F.block_part_flops(part, t, d, cfg.mlp_ratio) > 0
        assert r["flops"] == r["calls"] * r["flops_per_call"]
        assert r["time_s"] > 0 and r["time_per_call_s"] == pytest.approx(r["time_s"] / r["calls"])
        assert r["compile"]["total_s"] > 0 and r["compile"]["memory"]["program_peak_bytes"] > 0
        assert r["output_finite_fraction"] == 1.0 and r["tflops_per_s"] > 0
        assert r["xla_flops_per_call"] >= r["flops_per_call"]  # XLA also counts norms, softmax, GELU, biases
    mm = rows["block/matmuls"]  # the four Linear layers: XLA's count is the matmuls plus bias adds
    assert mm["xla_flops_per_call"] / mm["flops_per_call"] - 1 < 0.05, mm
    assert F.block_part_flops("full", t, d) == F.block_flops(t, d)
    dpa = rows["block/attention_core_dpa"]
    assert dpa["implementation"] == "default (implementation=None)"  # CPU: the XLA implementation
    assert 0 <= dpa["max_rel_diff_vs_attention_core"] < 2e-2
    assert "### Where a transformer block's time goes" in table
    for label in ("full", "full xla", "attention", "attention core", "attention core dpa", "matmuls", "mlp"):
        assert f"| tiny | {label} | 2 | {t} | 2 | " in table, label
    assert "| tiny | full | 2 | 68 | 2 | " in table and " | 100% | " in table
    assert "| tiny | rest (full xla - matmuls - attention core) | 2 | 68 |" in table
    assert rows["block/full"]["attention_impl"] == "auto" and rows["block/full_xla"]["attention_impl"] == "xla"


def test_block_table_lists_missing_and_failed_parts():
    def row(part, ms, **kw):
        return dict(model="base", name=f"block/{part}", batch=256, status="ok", seq_len=320, calls=24,
                    time_s=24 * ms / 1e3, time_per_call_s=ms / 1e3, tflops_per_s=300.0, mfu_peak=0.3, **kw)

    report = {"date": "2026-11-30T00:00:00+00:00", "device": {"kind": "NVIDIA H200", "platform": "gpu", "count": 1},
              "versions": {"jax": jax.__version__}, "peaks": {}, "total_s": 100.0, "results": [
                  row("full", 3.5), row("full_xla", 4.0), row("attention", 2.0), row("attention_core", 1.0),
                  dict(model="base", name="block/attention_core_dpa", batch=256, status="error",
                       error="ValueError: cuDNN does not support | this\nsecond line"),
                  row("matmuls", 2.5)]}
    text = suite.render_markdown(report)
    assert "| base | full | 256 | 320 | 24 | 3.500 | 100% | 300 | 30.0% | - | ok |" in text
    assert "| base | full xla | 256 | 320 | 24 | 4.000 | 114% | 300 | 30.0% | - | ok |" in text
    assert "| base | attention core | 256 | 320 | 24 | 1.000 | 29% |" in text
    assert "| base | attention core dpa | 256 | 320 | - | - | - | - | - | - | error: ValueError: cuDNN does not " \
           "support / this" in text
    assert "| base | mlp | 256 | 320 | - | - | - | - | - | - | not yet measured |" in text
    assert "| base | rest (full xla - matmuls - attention core) | 256 | 320 | | 0.500 | 12% |" in text


class FakeXlaRuntimeError(RuntimeError):
    """What jax raises when the device allocator fails."""


OOM = ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 19327352832 bytes.\n"
       "BufferAssignment OOM Debugging.\nBufferAssignment stats: ...")


def make_suite(**kw) -> suite.Suite:
    return suite.Suite(suite.Settings.quick_settings(what=["train"], out=None, table=None, **kw))


def test_oom_is_recorded_and_the_batch_halved():
    s = make_suite()
    tried = []

    def step(entry, b):
        tried.append(b)
        entry["compile"] = {"total_s": 1.0, "memory": {"program_peak_bytes": b * 2 ** 30}}
        if b > 2:
            raise FakeXlaRuntimeError(OOM)
        entry["time_s"] = 0.5

    last = s.guarded_halving("base", "train/rl_noremat", 16, step, lambda b: 0.0, "rl")
    assert tried == [16, 8, 4, 2]
    rows = s.report["results"]
    assert [(r["batch"], r["status"]) for r in rows] == [(16, "oom"), (8, "oom"), (4, "oom"), (2, "ok")]
    assert "Out of memory while trying to allocate" in rows[0]["error"]
    assert rows[0]["compile"]["memory"]["program_peak_bytes"] == 16 * 2 ** 30  # kept for the failed attempt
    assert last is rows[-1] and last["status"] == "ok"
    assert cli.exit_code(s.report) == 0  # out of memory is a result, not a failure of the suite

    s = make_suite()
    s.guarded_halving("base", "train/gsim", 5, lambda e, b: (_ for _ in ()).throw(FakeXlaRuntimeError(OOM)),
                      lambda b: 0.0)
    assert [(r["batch"], r["status"]) for r in s.report["results"]] == [(5, "oom"), (2, "oom"), (1, "oom")]

    s = make_suite()  # any other failure is an error, recorded once, and makes the exit status nonzero
    s.guarded_halving("base", "train/mar", 8, lambda e, b: 1 / 0, lambda b: 0.0)
    assert [(r["batch"], r["status"]) for r in s.report["results"]] == [(8, "error")]
    assert cli.exit_code(s.report) == 1


def test_oom_fallback_skips_batches_the_buffer_assignment_rules_out():
    s = make_suite()
    s.memory_limit = lambda: 5 * 2 ** 30  # the allocator's limit (GPU); CPU reports none
    tried = []

    def step(entry, b):  # 1 GiB of state + 1 GiB per example
        tried.append(b)
        entry["compile"] = {"total_s": 1.0, "memory": {"argument_size_in_bytes": 2 ** 30,
                                                        "program_peak_bytes": (1 + b) * 2 ** 30}}
        if (1 + b) * 2 ** 30 > 5 * 2 ** 30:
            raise FakeXlaRuntimeError(OOM)
        entry["time_s"] = 0.5

    s.guarded_halving("base", "train/mar", 32, step, lambda b: 0.0, "mar")
    assert tried == [32, 4]  # 16 and 8 need 17 and 9 GiB > 1.05 x 5 GiB: recorded, not compiled
    rows = s.report["results"]
    assert [(r["batch"], r["status"], r.get("predicted", False)) for r in rows] == [
        (32, "oom", False), (16, "oom", True), (8, "oom", True), (4, "ok", False)]
    assert "predicted out of memory" in rows[1]["error"]


def test_memory_poller_keeps_the_largest_sample():
    from marval_jax.benchmarks.timing import MemoryPoller
    values = iter([5, 9, 7] + [6] * 10 ** 6)
    with MemoryPoller(interval_s=0.001, stats=lambda: {"bytes_in_use": next(values)}) as poll:
        time.sleep(0.05)
    assert poll.result()["max_bytes_in_use"] == 9 and poll.result()["samples"] >= 4
    with MemoryPoller(stats=lambda: None) as poll:  # no statistics (CPU): nothing sampled, no thread
        pass
    assert poll.result() is None and poll._thread is None


def test_rl_runs_remat_on_again_at_the_batch_remat_off_fitted():
    s = make_suite(rl_batch=4)
    calls = []

    def train_rl(entry, b, remat):
        calls.append((b, remat))
        if not remat and b > 1:
            raise FakeXlaRuntimeError(OOM)
        entry["time_s"] = 1.0

    m = SimpleNamespace(train_rl=train_rl, need_train=lambda step, remat=True: (lambda b: 0.0))
    s.run_rl(m, "base")
    assert calls == [(4, True), (4, False), (2, False), (1, False), (1, True)]
    assert [(r["name"], r["batch"], r["status"]) for r in s.report["results"]] == [
        ("train/rl", 4, "ok"), ("train/rl_noremat", 4, "oom"), ("train/rl_noremat", 2, "oom"),
        ("train/rl_noremat", 1, "ok"), ("train/rl", 1, "ok")]


def test_time_budget_skips_instead_of_running():
    s = make_suite(time_budget_s=50.0)
    ran = []
    s.guarded("base", "train/mar", 256, ran.append, need_s=100.0)
    s.guarded("base", "train/gsim", 64, lambda e: ran.append(e) or e.update(time_s=1.0), need_s=10.0)
    rows = s.report["results"]
    assert [r["status"] for r in rows] == ["skipped", "ok"] and len(ran) == 1
    assert "time budget" in rows[0]["reason"]
    # estimates: the guesses before anything compiled, then 1.25 x the family's largest measured compile time
    assert s.est_compile("gsim") == suite.COMPILE_GUESS_S["gsim"]
    s.compiles["sample"] = [20.0]
    g = suite.COMPILE_GUESS_S
    assert s.est_compile("kv") == pytest.approx(1.25 * 20.0 * g["kv"] / g["sample"])
    s.compiles["kv"] = [40.0, 30.0]
    assert s.est_compile("kv") == 50.0


def test_compile_guesses_cover_the_measured_compiles():
    """COMPILE_GUESS_S is 1.25 x MAR-B's largest measured compile per family in the committed results (remat rows
    and scanned blocks aside): at least the measurement, so a first row does not run into the hard limit, and not
    over 1.5 x it, so a single-row call is not skipped for time it would not need."""
    fam_of = {"sample": "sample", "kv": "kv", "train/mar": "mar", "train/gsim": "gsim", "train/rl": "rl",
              "breakdown": "breakdown"}
    worst = {}
    for path in os.listdir(os.path.join(ROOT, "docs", "benchmarks")):
        if not path.endswith(".json"):
            continue
        with open(os.path.join(ROOT, "docs", "benchmarks", path)) as f:
            report = json.load(f)
        if not isinstance(report, dict) or (report.get("settings") or {}).get("scan_blocks"):
            continue
        for r in report.get("results", []):
            total = (r.get("compile") or {}).get("total_s") if r.get("status") == "ok" else None
            fam = next((v for k, v in fam_of.items() if r["name"].startswith(k)), None)
            if r.get("model") == "base" and total and fam:
                worst[fam] = max(worst.get(fam, 0.0), total)
    assert set(worst) == set(fam_of.values())
    for fam, measured in worst.items():
        assert measured <= suite.COMPILE_GUESS_S[fam] <= 1.5 * measured, (fam, measured)


def test_tables_show_kv_speedups_rl_rows_and_oom():
    def row(name, batch, t, **kw):
        return dict(model="base", name=name, batch=batch, status="ok", time_s=t, per_image_s=t / batch,
                    compile={"total_s": 30.0, "memory": {"program_peak_bytes": 3 * 2 ** 30}}, **kw)

    report = {"date": "2026-11-30T00:00:00+00:00", "device": {"kind": "NVIDIA H200", "platform": "gpu", "count": 1},
              "versions": {"jax": jax.__version__}, "peaks": {}, "total_s": 400.0, "results": [
                  row("sample/onestep", 256, 3.0),
                  row("kv/onestep/approx", 256, 1.0, baseline="sample/onestep", attention="bidirectional",
                      cache="approx r=2 R=4", max_rel_diff_vs_baseline=0.25),
                  row("kv/onestep/causal", 256, 3.3, baseline="sample/onestep", attention="causal", cache="none"),
                  row("kv/onestep/causal_exact", 256, 0.3, baseline="kv/onestep/causal", attention="causal",
                      cache="exact", max_rel_diff_vs_baseline=0.004),
                  row("train/rl", 4, 2.0, images_per_s=2.0, allocator_peak_bytes=40 * 2 ** 30,
                      allocator_peak_is_own=False),
                  dict(model="base", name="train/rl_noremat", batch=8, status="oom", error=OOM,
                       compile={"total_s": 50.0, "memory": {"program_peak_bytes": 150 * 2 ** 30}}),
                  row("train/rl_noremat", 4, 1.5, images_per_s=2.7, allocator_peak_bytes=95 * 2 ** 30,
                      allocator_peak_is_own=True, allocator_sampled={"max_bytes_in_use": 90 * 2 ** 30}),
                  dict(model="base", name="kv/teacher/approx", batch=1, status="skipped", reason="time budget")]}
    text = suite.render_markdown(report)
    assert "| base | onestep | bidirectional | approx r=2 R=4 | 256 | 1.000 |" in text
    assert "| sample/onestep | 3.000 | 3.00x | 2.50e-01 | ok |" in text
    assert "| kv/onestep/causal | 3.300 | 11.00x | 4.00e-03 | ok |" in text
    assert "| base | rl, remat on | 4 | 2.000 | 2 | 30.0 | 3.00 | <= 40.00 |" in text
    assert "| base | rl, remat off | 4 | 1.500 | 3 | 30.0 | 3.00 | 90.00 |" in text
    assert "| base | rl, remat off | 8 |" in text and "150.00" in text
    assert "oom (Out of memory while trying to allocate 19327352832 bytes." in text
    assert "| base | teacher | bidirectional | approx | 1 | - |" in text and "skipped |" in text
    assert "| - | mar | - |" in text  # a step not measured at all is listed


def test_committed_table_is_the_committed_json_rendered():
    """docs/benchmarks.md's generated block is what render_markdown makes of docs/benchmarks/h200.json, byte for byte
    (a change to the tables' format re-renders the document: --from-json docs/benchmarks/h200.json --table ...)."""
    with open(os.path.join(ROOT, "docs", "benchmarks", "h200.json")) as f:
        report = json.load(f)
    with open(os.path.join(ROOT, "docs", "benchmarks.md")) as f:
        doc = f.read()
    block = doc[doc.index(suite.BEGIN):doc.index(suite.END) + len(suite.END)]
    assert suite.render_markdown(report) == block


def test_two_runs_merge_into_one_table():
    head = {"device": {"kind": "NVIDIA H200", "platform": "gpu", "count": 1}, "versions": {}}
    one = dict(head, date="2026-11-30T00:00:00+00:00", total_s=480.0, peaks={"matmul_measured_tflops": None},
               results=[dict(model="base", name="sample/onestep", batch=256, status="ok", time_s=3.0),
                        dict(model="base", name="kv/onestep/approx", batch=256, status="skipped", reason="budget"),
                        dict(model="base", name="train/rl", batch=2, status="ok", time_s=0.5)])
    two = dict(head, date="2026-11-30T01:00:00+00:00", total_s=300.0, peaks={"matmul_measured_tflops": 700.0},
               results=[dict(model="base", name="sample/onestep", batch=256, status="skipped", reason="x"),
                        dict(model="base", name="kv/onestep/approx", batch=256, status="ok", time_s=1.5)])
    merged = suite.merge_reports([one, two])
    # the measured row takes the skipped row's place, so the table keeps the suite's order
    assert [(r["name"], r["status"]) for r in merged["results"]] == [("sample/onestep", "ok"),
                                                                        ("kv/onestep/approx", "ok"),
                                                                        ("train/rl", "ok")]
    assert merged["total_s"] == 780.0 and merged["peaks"]["matmul_measured_tflops"] == 700.0
    assert "| sample/onestep | 3.000 | 2.00x |" in suite.render_markdown(merged)


def test_from_json_writes_the_merged_report(tmp_path):
    head = {"device": {"kind": "NVIDIA H200", "platform": "gpu", "count": 1}, "versions": {}, "peaks": {}}
    paths = []
    for i, status in enumerate(("skipped", "ok")):
        rep = dict(head, date=f"2026-11-30T0{i}:00:00+00:00", total_s=10.0,
                   results=[dict(model="base", name="sample/onestep", batch=256, status=status, time_s=3.0)])
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(rep))
    out, table = tmp_path / "merged.json", tmp_path / "t.md"
    assert cli.main(["--from-json", f"{paths[0]},{paths[1]}", "--table", str(table), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert [r["status"] for r in merged["results"]] == ["ok"] and merged["total_s"] == 20.0
    assert "| base | onestep | 256 | 3.000 |" in table.read_text()


def test_cached_sampler_flops():
    cfg = suite.model_config("base")
    kw = dict(batch=256, num_iter=64, cfg_scale=1.0, head_calls=1)
    full = F.sampler_flops(cfg, **kw)
    assert F.cached_sampler_flops(cfg, policy=("approx", 0, 1), **kw)["total"] == full["total"]  # refresh always
    approx = F.cached_sampler_flops(cfg, policy=("approx", 2, 4), **kw)
    exact = F.cached_sampler_flops(cfg, policy="exact", **kw)
    assert approx["refresh_steps"] == 16 and exact["refresh_steps"] == 0
    assert exact["head"] == approx["head"] == full["head"]
    assert exact["transformer"] < approx["transformer"] < 0.3 * full["transformer"]
    assert [s["ingest_cap"] for s in exact["segments"]] == [4, 6, 6, 7]  # docs/kv_cache.md's W at K = 64


def test_cli_defaults_and_checks():
    a = cli.parse([])
    assert (a.gsim_batch, a.rl_batch, a.kv_approx) == (defaults.GSIM_BATCH, defaults.RL_BATCH, "2,4") == (64, 2, "2,4")
    assert set(a.train_steps.split(",")) == {"mar", "gsim", "rl", "rl_noremat"}
    assert set(a.what.split(",")) == {"sample", "train", "kv", "breakdown"}  # block only when named
    assert "block" in defaults.WHAT and (a.block_batch, a.block_calls) == (256, 24)
    with pytest.raises(UserError, match="--block-batch"):
        cli.main(["--what", "block", "--block-calls", "0"])
    with pytest.raises(UserError, match="--what"):
        cli.main(["--what", "sample,cache"])
    with pytest.raises(UserError, match="--kv-approx"):
        cli.main(["--kv-approx", "2,0"])
    with pytest.raises(UserError, match="--newest-wins merges runs"):
        cli.main(["--newest-wins"])
    with pytest.raises(UserError, match="--attention-impl takes one of .*flash.*, got 'flsh'"):
        cli.main(["--attention-impl", "flsh"])
    with pytest.raises(UserError, match="--kernels takes one of .*pallas.*, got 'triton'"):
        cli.main(["--kernels", "triton"])
    with pytest.raises(UserError, match="--from-json needs --table"):
        cli.main(["--from-json", "a.json"])
    # a --rows pattern must name a row of --what (block rows only with --what block)
    with pytest.raises(UserError, match="'block/\\*' matches no row of --what sample,train"):
        cli.main(["--plan", "--what", "sample,train", "--rows", "sample/*,block/*"])
    assert call_cli(lambda: cli.main(["--plan", "--rows", "kv/nope"]), argv=[]) == EXIT_USER_ERROR


def test_h200_script_dry_run():
    env = dict(os.environ, OUT="/tmp/o", BUDGET="300")
    proc = subprocess.run(["bash", "launch/gpu_bench.sh", "--dry-run", "--kv-batch", "256"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    cmd = next(line for line in proc.stdout.splitlines() if line.startswith("+ timeout"))
    for part in ("--models base", "--batch 1\\,256", "--out /tmp/o/gpu.json", "--table /tmp/o/benchmarks.md",
                 "--time-budget 300", f"--rl-batch {defaults.RL_BATCH}", f"--gsim-batch {defaults.GSIM_BATCH}",
                 "--kv-approx 2\\,4", "--kv-batch 256", "tee -a /tmp/o/bench.log"):
        assert part in cmd, part


def test_attention_impl_and_kernels_flags_set_every_rows_model(tmp_path):
    """--attention-impl and --kernels: every row's model with it (recorded in the report's model_configs); the config's default
    otherwise."""
    assert plan(tmp_path, "--rows", "sample/onestep")["model_configs"]["tiny"]["attention_impl"] == "auto"
    rep = plan(tmp_path, "--rows", "sample/onestep", "--attention-impl", "flash")
    assert rep["model_configs"]["tiny"]["attention_impl"] == "flash"
    assert plan(tmp_path, "--rows", "sample/onestep")["model_configs"]["tiny"]["kernels"] == "xla"
    rep = plan(tmp_path, "--rows", "sample/onestep", "--kernels", "pallas")
    assert rep["model_configs"]["tiny"]["kernels"] == "pallas"
