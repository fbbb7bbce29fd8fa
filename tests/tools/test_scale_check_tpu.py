"""scale_check --target=tpu, the parts that need no TPU compiler (run in the suite's CPU process, libtpu not loaded):
slice names, the chip table's roofline, the batch bisection, the report block in docs/scale.md, and the one-line
error when libtpu is missing. The compile itself: tests/tpu_aot."""
import json
import sys

import pytest

from marval_jax.tools.scale_check import tpu
from marval_jax.tools.scale_check.cli import main
from marval_jax.user_errors import UserError


def test_topologies_name_the_slice_a_user_rents():
    assert tpu.parse_topology("v5e:16x16") == (tpu.CHIPS["v5e"], 256)
    assert tpu.pod_name("v5e:16x16") == "v5e-256" and tpu.pod_name("v6e:16x16") == "v6e-256"
    assert tpu.pod_name("v5p:4x4x4") == "v5p-128" and tpu.pod_name("v4:4x4x4") == "v4-128"  # cores: 2 per chip
    for bad in ("v5e", "v9:2x2", "v5e:2xx2", "tpu:2x2"):
        with pytest.raises(UserError, match="--topology"):
            tpu.parse_topology(bad)


def test_roofline_is_the_slower_of_compute_and_hbm_traffic():
    v5e = tpu.CHIPS["v5e"]
    r = tpu.roofline_s(v5e, flops=197e12, bytes_accessed=819e9 / 2)   # 1 s of compute, 0.5 s of traffic
    assert r["step_s"] == r["compute_s"] == 1.0 and r["memory_s"] == 0.5 and r["bound"] == "compute"
    r = tpu.roofline_s(v5e, flops=197e12 / 4, bytes_accessed=819e9)
    assert r["step_s"] == r["memory_s"] == 1.0 and r["bound"] == "memory"


@pytest.mark.parametrize("fixed,per_ex,cap,hi", [(3, 2, 100, 256), (3, 2, 4, 256), (0, 1, 1000, 64), (5, 7, 5, 8),
                                                 (1, 1, 38, 40)])
def test_bisection_finds_the_largest_fitting_batch(fixed, per_ex, cap, hi):
    fits = lambda b: fixed + per_ex * b <= cap  # noqa: E731 (a monotone memory model)
    best, seen = tpu.bisect_batch(fits, hi)
    assert best == max([b for b in range(1, hi + 1) if fits(b)], default=0)
    assert len(seen) <= 2 * hi.bit_length() + 1     # doubling, then bisection: logarithmic in hi


def _rec(pod_topology="v5e:2x2", step="mar", total=3 * 2 ** 30, fsdp=4):
    chip, n = tpu.parse_topology(pod_topology)
    return dict(topology=pod_topology, pod=tpu.pod_name(pod_topology), chips=n, model="base", step=step, remat=None,
                rl_num_iter=None, mesh=dict(data=n // fsdp, fsdp=fsdp, tensor=1), per_chip_batch=8,
                global_batch=8 * n, memory=dict(argument=2 ** 30, output=2 ** 30, alias=2 ** 30, temp=total - 2 ** 30,
                                                total=total),
                hbm_bytes=chip.hbm_gib * 2 ** 30, fits=total <= chip.hbm_gib * 2 ** 30,
                cost=dict(flops=2e12, bytes_accessed=1e9), our_flops=1.9e12,
                roofline=tpu.roofline_s(chip, 2e12, 1e9), compile_s=447.0, host_peak_rss_bytes=int(9.5 * 2 ** 30), jax="0.10.2", libtpu="0.0.42.1",
                commit="abc1234")


def test_report_block_rows_missing_cases_and_splice():
    data = {"cases": {"a": _rec(), "b": _rec("v5p:4x4x4", "gsim", total=100 * 2 ** 30, fsdp=16)},
            "commands": {"python -m marval_jax.tools.scale_check --target=tpu --topology=v5e:16x16": dict(
                date="2026-12-06", cases=[["a", "v5e-4 MAR-B"], ["zz", "v5e-256 MAR-H MAR pretraining"]])}}
    block = tpu.render(data)
    assert block.startswith(tpu.BEGIN) and block.rstrip().endswith(tpu.END)
    assert ("| v5e-4 (v5e:2x2) | MAR-B MAR pretraining | 1/4/1 | 8 (32) | 1.00 | 2.00 | 3.00 | 16 | yes | 2.00 | "
            "1.90 | 1.05 | 10.2 (compute) | 447 (9.5 GiB host) |") in block
    assert "| v5p-128 (v5p:4x4x4) | MARVAL-B GSIM | 4/16/1 | 8 (512) |" in block and "| 95 | **no** |" in block
    assert "Not measured yet" in block and "v5e-256 MAR-H MAR pretraining" in block and "447 s" in block
    assert "a prediction" in block
    assert ("- MAR-B MAR pretraining on v5e-4 (mesh data/fsdp/tensor 1/4/1) fits at per-chip batch 8 (global 32): "
            "3.00 of 16 GiB (19%)") in block
    assert "- MARVAL-B GSIM on v5p-128 (mesh data/fsdp/tensor 4/16/1) **does not fit** at per-chip batch 8" in block
    old = "# Scale\n\nCPU text\n\n" + tpu.render({"cases": {}, "commands": {}}) + "\nafter\n"
    new = tpu.splice(old, block)
    assert new.count(tpu.BEGIN) == 1 and "MAR-B MAR pretraining" in new and new.endswith("\nafter\n")
    assert new.startswith("# Scale\n\nCPU text\n\n")
    assert tpu.splice("# Scale\n", block) == "# Scale\n\n" + block           # appended when the file had none
    # the CPU report rewrites the file: the TPU block is carried over, once
    kept = tpu.keep_block(new, "# Scale (CPU, rerendered)\n")
    assert kept.startswith("# Scale (CPU, rerendered)\n") and kept.count(tpu.BEGIN) == 1 and "MAR-B MAR" in kept
    assert tpu.keep_block("no block", "x\n") == "x\n"


def test_report_only_renders_the_json_without_libtpu(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)   # as if the extra were not installed
    js, out = tmp_path / "t.json", tmp_path / "scale.md"
    js.write_text(json.dumps({"cases": {"a": _rec()}, "commands": {}}))
    out.write_text("# Scale\n")
    assert main(["--target=tpu", "--report_only", "--json", str(js), "--out", str(out)]) == 0
    assert "| v5e-4 (v5e:2x2) | MAR-B MAR pretraining |" in out.read_text() and "Not measured" not in out.read_text()
    # a planned command is recorded with its cases, which the report lists as not measured yet (nothing compiled)
    assert main(["--target=tpu", "--report_only", "--topology=v5p:4x4x4", "--models", "huge", "--steps", "gsim,rl",
                 "--rl_remat", "on", "--mesh", "data=-1,fsdp=16,tensor=1", "--batch", "4", "--json", str(js),
                 "--out", str(out)]) == 0
    text = out.read_text()
    assert ("Not measured yet (recorded by the commands above, not compiled by the time of writing): v5p-128 "
            "MARVAL-H GSIM at per-chip batch 4; v5p-128 MARVAL-H RL K=64 remat on at per-chip batch 4. The measured "
            "compile times per case on this 2-core shared machine were 447 s") in text
    assert ("    python -m marval_jax.tools.scale_check --target=tpu --topology=v5p:4x4x4 --models huge --steps gsim,rl "
            "--rl_remat on --mesh data=-1,fsdp=16,tensor=1 --batch 4    # ") in text
    assert list(json.loads(js.read_text())["cases"]) == ["a"]
    assert main(["--target=tpu", "--report_only", "--note", "Background run: 1 case in flight.", "--json", str(js),
                 "--out", str(out)]) == 0
    assert out.read_text().count("Background run: 1 case in flight.") == 1 and "--note" not in out.read_text()
    assert tpu.command_line(["--target=tpu", "--report_only", "--json", "j", "--out=o", "--note", "n", "--batch",
                             "4", "--verbose"]) == "python -m marval_jax.tools.scale_check --target=tpu --batch 4"
    # one command typed in two orders is one entry (docs/scale_tpu.json held the same row's command twice)
    typed = ["--target=tpu", "--topology=v5e:16x16", "--models", "huge", "--steps", "mar", "--batch", "8", "--mesh",
             "data=-1,fsdp=16,tensor=1"]
    assert tpu.command_line(typed) == tpu.command_line(typed[:6] + typed[8:] + typed[6:8]) == (
        "python -m marval_jax.tools.scale_check --target=tpu --topology=v5e:16x16 --models huge --steps mar "
        "--mesh data=-1,fsdp=16,tensor=1 --batch 8")


def test_missing_libtpu_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)   # `import libtpu` raises ImportError, as without the extra
    with pytest.raises(UserError) as e:
        main(["--target=tpu", "--topology=v5e:2x2", "--models", "tiny", "--steps", "mar", "--json",
              str(tmp_path / "t.json")])
    assert "pip install '.[tpu-aot]'" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "t.json").exists()           # refused before anything was recorded


@pytest.mark.parametrize("argv,match", [
    (["--report_only"], "--report_only needs --out"),
    (["--report_only", "--out", "o.md", "--topology=v5e:2x2", "--batch", "0"], "--batch: the per-chip batch"),
    (["--report_only", "--out", "o.md", "--topology=v5e:2x2", "--steps", "mar,sampler"], "--steps: unknown"),
    (["--report_only", "--out", "o.md", "--topology=v5e:2x2", "--mesh", "data=2,model=2"], "--mesh: expected"),
    (["--report_only", "--out", "o.md", "--topology=v5e:2x2,v5e:4x4", "--mesh", "data=-1,fsdp=8,tensor=1"],
     "4 devices do not divide")])
def test_bad_arguments_are_user_errors(tmp_path, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=match):
        main(["--target=tpu", "--json", "t.json", *argv])
    assert not (tmp_path / "t.json").exists()           # nothing recorded
