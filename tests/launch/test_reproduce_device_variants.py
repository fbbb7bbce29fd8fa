"""STAGE=variants of launch/reproduce_fmnist_device.sh checks VARIANTS before anything runs: a malformed entry or a
repeated name is an error naming it, with no stash, wheel install or training started (a device call's setup is
minutes of a limited budget)."""
from __future__ import annotations

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _variants(tmp_path, variants: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, STAGE="variants", STASH=str(tmp_path / "stash"), SITE=str(tmp_path / "site"),
               DATASETS=str(tmp_path / "datasets"), HOME=str(tmp_path / "home"), W=str(tmp_path / "w"))
    env.pop("VARIANTS", None)
    if variants is not None:
        env["VARIANTS"] = variants
    return subprocess.run(["bash", os.path.join(ROOT, "launch", "reproduce_fmnist_device.sh")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("variants, message", [
    (None, "needs VARIANTS="),
    ("g15", "'g15' is not NAME:key=value"),
    ("g15:gsim.guidance_scale", "'g15:gsim.guidance_scale' is not NAME:key=value"),
    ("g15:gsim.guidance_scale=1.5,", "'g15:gsim.guidance_scale=1.5,' is not NAME:key=value"),
    ("g/15:gsim.guidance_scale=1.5", "'g/15:gsim.guidance_scale=1.5' is not NAME:key=value"),
    ("a:gsim.t_min=200 a:generator.lr=1e-4", "names repeat: a a"),
])
def test_bad_variants_are_errors_before_anything_runs(tmp_path, variants, message):
    proc = _variants(tmp_path, variants)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "stash").exists() and not (tmp_path / "site").exists()


def test_well_formed_variants_pass_the_check(tmp_path):
    """Past the check the script looks for its inputs: with none carried that is exit 3, not the check's 2."""
    proc = _variants(tmp_path, "g15:gsim.guidance_scale=1.5 lr1e4:generator.lr=1e-4,fake_score.lr=1e-4")
    assert proc.returncode == 3 and "carry .devstate/lean" in proc.stderr, proc.stderr


def _stub_bin(tmp_path):
    """python3 and nvidia-smi that only log their arguments (one line per call) into calls.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python3", "nvidia-smi"):
        (bin_dir / name).write_text(f'#!/bin/bash\necho "{name} $*" >> {tmp_path}/calls.log\n')
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("cache", [None, "2,4"])
def test_variant_rows_take_the_cache_policy(tmp_path, cache):
    """Past the inputs, the FID reference is cached once, every student is trained and then measured with
    --only=student_K64_cfg1 (which includes its approximate-cache row); RESULTS_CACHE=r,R reaches each row as
    --cache, and is absent when unset."""
    (tmp_path / "stash" / "x" / "fmnist").mkdir(parents=True)
    (tmp_path / "site").mkdir()
    (tmp_path / "w" / "export" / "fmnist_teacher").mkdir(parents=True)
    env = dict(os.environ, STAGE="variants", STASH=str(tmp_path / "stash"), SITE=str(tmp_path / "site"),
               DATASETS=str(tmp_path / "datasets"), HOME=str(tmp_path / "home"), W=str(tmp_path / "w"),
               OUT=str(tmp_path / "out"), VARIANTS="a:gsim.guidance_scale=1.5 b:generator.lr=1e-4,fake_score.lr=1e-4",
               PATH=f"{_stub_bin(tmp_path)}:{os.environ['PATH']}")
    env.pop("RESULTS_CACHE", None)
    if cache is not None:
        env["RESULTS_CACHE"] = cache
    (tmp_path / "out").mkdir()
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "reproduce_fmnist_device.sh")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    trains = [c for c in calls if "marval_jax.programs.reproduce" in c]
    # the FID reference once, before the processes that share it start side by side
    refs = [i for i, c in enumerate(calls) if "marval_jax.tools.results reference" in c]
    assert len(refs) == 1 and refs[0] < calls.index(trains[0]), calls
    rows = [c for c in calls if "marval_jax.tools.results run" in c]
    assert len(trains) == 2 and "--set student:gsim.guidance_scale=1.5" in trains[0]
    assert "--set student:generator.lr=1e-4 --set student:fake_score.lr=1e-4" in trains[1]
    assert len(rows) == 2 and all("--only=student_K64_cfg1" in r and "--no-timing" in r for r in rows)
    if cache is None:
        assert not any("--cache" in r for r in rows)
    else:
        assert all(f"--cache={cache}" in r.split() for r in rows)
