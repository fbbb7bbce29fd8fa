"""benchmarks/kernel_check in interpret mode on tiny shapes: every row runs, and each kernel's error against its XLA
twin is within a few bf16 roundings (the outputs are bf16; one rounding is 2^-8 relative to the value, 2^-9 to the
largest), so a kernel that computes something else fails here before a device call is spent on it."""
from __future__ import annotations

import json
import subprocess
import sys

from marval_jax.benchmarks import kernel_check


def test_quick_run_writes_every_row_with_small_errors(tmp_path):
    out = tmp_path / "k.json"
    assert kernel_check.main(["--quick", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["interpret"] is True and rep["device"]["kind"]
    rows = {r["row"]: r for r in rep["rows"]}
    assert set(rows) == {"ln_linear/qkv", "ln_linear/fc1_gelu", "flash/fwd_bwd"}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    bound = 8 * 2.0 ** -8
    assert rows["ln_linear/qkv"]["rel_err"] < bound and rows["ln_linear/fc1_gelu"]["rel_err"] < bound
    assert rows["flash/fwd_bwd"]["rel_err_out"] < bound
    assert all(e < bound for e in rows["flash/fwd_bwd"]["rel_err_grads"])
    for r in rows.values():
        assert r["kernel"]["median_s"] > 0


def test_unwritable_out_is_one_error_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = subprocess.run([sys.executable, "-m", "marval_jax.benchmarks.kernel_check", "--quick", "--out",
                        str(blocker / "k.json")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:"), r.stderr[-2000:]


def test_sweep_times_each_tiling_records_the_refused_ones_and_picks_the_fastest():
    grid = {"block_m": (16,), "block_n": (16, 32), "block_k": (16, 64), "num_warps": (4,), "num_stages": (3,)}
    rows = kernel_check.ln_linear_sweep_rows(2, 8, 32, True, 0.01, grid)   # K = 32: block_k 64 does not divide it
    sweep = [r for r in rows if r["row"] == "ln_linear/qkv/sweep"]
    assert len(sweep) == 4
    bad = [r for r in sweep if r["status"] != "ok"]
    assert [r["block_k"] for r in bad] == [64, 64] and all("block_k" in r["error"] for r in bad)
    best = next(r for r in rows if r["row"] == "ln_linear/qkv/best")
    assert best["status"] == "ok" and best["tried"] == 4 and best["compiled"] == 2
    fastest = min((r for r in sweep if r["status"] == "ok"), key=lambda r: r["kernel"]["median_s"])
    assert best["best"]["block_n"] == fastest["block_n"] and best["best"]["block_k"] == 16
    assert best["best_over_xla"] == best["best"]["kernel"]["median_s"] / best["xla"]["median_s"]
    assert {r["row"] for r in rows} == {f"ln_linear/{n}/{k}" for n in ("qkv", "fc1_gelu") for k in ("sweep", "best")}
