"""marval_jax.tools.scale_check: the tool compiles a real train step on forced CPU devices (in its own subprocess)
and reports positive per-device memory that shrinks as the FSDP axis grows; the memory model and report are checked
on synthetic records."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from marval_jax.tools import scale_check as sc

ROOT = pathlib.Path(__file__).resolve().parents[2]
GB = 1e9


def _run_tool(tmp_path, fsdp):
    cache = tmp_path / f"fsdp{fsdp}.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-m", "marval_jax.tools.scale_check", "--devices", "8", "--models", "tiny", "--steps", "mar",
         "--mesh", f"data=-1,fsdp={fsdp},tensor=1", "--batches", "2", "--cache", str(cache),
         "--out", str(tmp_path / f"fsdp{fsdp}.md")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rec,) = json.loads(cache.read_text()).values()
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
