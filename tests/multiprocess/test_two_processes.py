"""Two processes x 4 CPU devices (one program, joined by jax.distributed over localhost, gloo collectives) train
tiny MAR with FSDP across both processes (mesh data=1, fsdp=8) and agree with one process x 8 devices: the loss
curve, a preemption (SIGTERM to process 1 alone) and its resume, and the sample grid.

Three launches in all (module fixtures): the 1 x 8 reference run, then `--mode evaluate` in the same process; the
2 x 4 run preempted by a SIGTERM to process 1 once process 0 has logged step 1; and the 2 x 4 resume of that workdir
to the end, followed in the same process group (tests/multiprocess/pipeline.py) by `--mode evaluate`, 2 distill
steps with that run as teacher, and 2 rl steps with that student.

Evaluation. Each evaluation reads its own run's workdir (a params checkpoint written by one process cannot be read
by two: checkpoints/params_io restores with the saved shardings, orbax's "Topology mismatch"), whose parameters the
loss-curve test shows equal (measured: to the last bit); on the same 8-device mesh with the batch split 8 ways, sampling, Inception and classifier compute each row on one device with replicated weights, so
the two layouts run the same per-row arithmetic and may differ only in the order a kernel adds its terms. The
features then agree within the Inception chain's reassociation bound relative to their scale,
r = reassociation_atol(inception depth, 1) (numerics.py; ~2.9e-4), and the FID, quadratic in the features, within
rtol = 2 r. The evaluation grids follow the grid rule below.

Tolerances. Both layouts run the same program on the same 8-device FSDP mesh with the same global batch, row for
row (data/pipeline.py HostRows); what may differ is the order in which a collective adds the 8 devices' partial
sums (gloo across processes, XLA's in-process collectives otherwise). Reordering a sum of n = 8 float32 terms moves
it by at most (n - 1) * eps relative to the sum of their magnitudes (eps = 2**-23). Per step that enters the loss
once (forward reductions) and the update at most twice more (Adam's m / sqrt(v) ratio: one factor each), and over
the S = 10 steps of a run with lr 1e-3 the errors add up no faster than linearly (the parameter-to-loss map is
near-linear for such small updates): rtol = 3 * S * (n - 1) * eps ~= 2.5e-5. A sample grid is written as uint8
levels round((x + 1) / 2 * 255); an image difference far below one level (1 / 127.5 in x) moves a pixel across at
most one rounding boundary, so levels differ by at most 1, and only pixels within the difference of a boundary
change: a share of at most 255 * rtol (about 0.6%).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal

import numpy as np
import pytest
from PIL import Image

from launcher import TINY, launch, losses

from marval_jax.numerics import ULP_TRANSCENDENTAL, reassociation_atol

EPS = float(np.finfo(np.float32).eps)
STEPS, DEVICES = 10, 8
RTOL = 3 * STEPS * (DEVICES - 1) * EPS
RUN = TINY + [f"--config.train.num_steps={STEPS}", f"--config.train.sample_every={STEPS}",
              "--config.train.ckpt_every=100"]
GRID = f"samples/step_{STEPS:08d}.png"
MESH = TINY[:2]
EVAL_TAG = "teacher_K4"


def _inception_depth() -> int:
    from marval_jax.evaluation import inception
    units = inception.conv_units(inception.FIDInceptionV3())
    return sum(int(np.prod(u.weight[...].shape[:3])) + 3 + ULP_TRANSCENDENTAL for _, u in units) + 7 + 9 * 11 + 64


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory):
    """The converted FID Inception and fixed reference statistics."""
    pytest.importorskip("torch")
    from marval_jax.evaluation.fid import save_statistics
    from marval_jax.tools.convert_inception import convert
    tmp = tmp_path_factory.mktemp("eval_inputs")
    ref = save_statistics(str(tmp / "ref.npz"), np.linspace(0, 1, 2048), np.diag(np.linspace(0.5, 1.5, 2048)))
    return {"inception": convert(str(tmp / "inception.npz")), "ref": ref, "tmp": tmp}


def _evaluate_stage(inputs, workdir):
    out = pathlib.Path(workdir) / "eval"
    return ["evaluate", "configs/mar.py:tiny", workdir,
            MESH + ["--config.sample.num_images=16", "--config.sample.batch_size=16", "--config.sample.crop=28",
                    f"--config.sample.fid_ref={inputs['ref']}", f"--config.sample.inception={inputs['inception']}",
                    "--config.sample.pr_num_real=16", f"--out={out}"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, eval_inputs):
    """One process x 8 devices, uninterrupted; then --mode evaluate in the same process."""
    workdir = tmp_path_factory.mktemp("one_process")
    run = launch("train", "configs/mar.py:tiny", workdir, RUN, processes=1, devices=DEVICES,
                 then=[_evaluate_stage(eval_inputs, workdir)], tmp=eval_inputs["tmp"])
    assert run.returncode == 0, run.text()[-4000:]
    return workdir


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    """Two processes x 4 devices; SIGTERM to process 1 alone once process 0 has logged step 1."""
    workdir = tmp_path_factory.mktemp("two_processes")
    sent = []

    def on_line(line, pids):
        if not sent and re.match(r"\[0\] \[\s+1\] ", line):
            os.kill(pids[1], signal.SIGTERM)
            sent.append(pids[1])

    run = launch("train", "configs/mar.py:tiny", workdir, RUN, on_line=on_line)
    assert sent, run.text()[-4000:]
    return workdir, run


@pytest.fixture(scope="module")
def resumed(preempted, eval_inputs):
    """The resume to the end, then in the same 2-process group: evaluate, 2 distill steps (teacher: this run),
    2 rl steps (student: that distill run)."""
    workdir, _ = preempted
    steps = ["--config.train.num_steps=2", "--config.train.sample_every=0", "--config.train.ckpt_every=2"]
    then = [_evaluate_stage(eval_inputs, workdir),
            ["distill", "configs/marval.py:tiny", workdir / "distill",
             TINY + steps + [f"--config.teacher_ckpt={workdir}"]],
            ["rl", "configs/marval_rl.py:tiny", workdir / "rl",
             TINY + steps + [f"--config.student_ckpt={workdir / 'distill'}"]]]
    return workdir, launch("train", "configs/mar.py:tiny", workdir, RUN, then=then, tmp=eval_inputs["tmp"])


def _stop_step(run, process: int) -> int | None:
    found = [int(m.group(1)) for line in run.of(process) for m in [re.search(r"preempted at step (\d+)", line)] if m]
    return found[0] if found else None


def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(preempted):
    workdir, run = preempted
    assert run.returncode == 0, run.text()[-4000:]
    k0, k1 = _stop_step(run, 0), _stop_step(run, 1)
    assert k0 is not None and k0 == k1, (k0, k1, run.text()[-4000:])
    assert 1 <= k0 < STEPS                                    # stopped by the signal, not by the end of the run
    step_dir = pathlib.Path(workdir, "checkpoints", str(k0))
    assert (step_dir / "commit_success.txt").exists() or (step_dir / "_CHECKPOINT_METADATA").exists()
    # every process saved its part: both data iterator states are in the checkpoint
    assert sorted(p.name for p in (step_dir / "data").glob("process_*.json")) == \
        ["process_0-of-2.json", "process_1-of-2.json"]
    assert sorted(int(p.name) for p in pathlib.Path(workdir, "checkpoints").iterdir() if p.name.isdigit()) == [k0]


def test_resume_on_two_processes_gives_the_one_process_loss_curve(reference, preempted, resumed):
    workdir, run = resumed
    assert run.returncode == 0, run.text()[-4000:]
    k = _stop_step(preempted[1], 0)
    assert any(f"resumed from step {k}" in line for line in run.of(0)) and \
        any(f"resumed from step {k}" in line for line in run.of(1))
    ref, got = losses(reference), losses(workdir)
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=RTOL, atol=0)


def test_only_process_zero_writes_metrics(resumed):
    workdir, run = resumed
    rows = [json.loads(line) for line in pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines() if line]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))   # one row per step: one writer
    assert not any(re.match(r"\[\s+\d+\] ", line) for line in run.of(1))  # process 1 prints no metrics
    assert any(re.match(r"\[\s+\d+\] ", line) for line in run.of(0))


def test_grid_on_two_processes_is_the_one_process_grid(reference, resumed):
    """Every process enters the jitted sampler (the state is sharded over both): with process 0 alone the step-10
    grid hangs the resumed run (killed by the hang guard)."""
    workdir, run = resumed
    assert run.returncode == 0, run.text()[-4000:]
    a = np.asarray(Image.open(pathlib.Path(reference, GRID))).astype(int)
    b = np.asarray(Image.open(pathlib.Path(workdir, GRID))).astype(int)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1
    assert (a != b).mean() <= 255 * RTOL


def test_evaluate_on_two_processes_gives_the_one_process_fid_and_grid(reference, resumed):
    """--mode evaluate split over 2 processes x 4 devices (each samples 2 of every 16 images, Inception and
    classifier where the images are, features gathered) gives the 1 x 8 numbers; process 0 alone writes."""
    workdir, run = resumed
    assert any("# stage 1: evaluate done, exit 0" in line for line in run.of(1)), run.text()[-4000:]
    one = json.loads(pathlib.Path(reference, "eval", f"{EVAL_TAG}.json").read_text())
    two = json.loads(pathlib.Path(workdir, "eval", f"{EVAL_TAG}.json").read_text())
    assert (one["processes"], one["devices"], two["processes"], two["devices"]) == (1, 8, 2, 8)
    assert one["num_images"] == two["num_images"] == 16
    rtol = 2 * reassociation_atol(_inception_depth(), 1.0)
    assert abs(two["fid"] - one["fid"]) <= rtol * abs(one["fid"]), (one["fid"], two["fid"], rtol)
    assert two["class_accuracy"] == one["class_accuracy"]
    assert 0 <= two["precision"] <= 1 and 0 <= two["recall"] <= 1
    a = np.asarray(Image.open(pathlib.Path(reference, "eval", f"{EVAL_TAG}.png"))).astype(int)
    b = np.asarray(Image.open(pathlib.Path(workdir, "eval", f"{EVAL_TAG}.png"))).astype(int)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1 and (a != b).mean() <= 255 * RTOL
    # the report line is printed by the writer only
    assert any(line.startswith("{") and '"fid"' in line for line in run.of(0))
    assert not any(line.startswith("{") and '"fid"' in line for line in run.of(1))


def test_distill_and_rl_run_two_steps_on_two_processes(resumed):
    workdir, run = resumed
    for p in (0, 1):
        assert any("# stage 2: distill done, exit 0" in line for line in run.of(p)), run.text()[-4000:]
        assert any("# stage 3: rl done, exit 0" in line for line in run.of(p)), run.text()[-4000:]
    for sub in ("distill", "rl"):
        assert (pathlib.Path(workdir, sub, "checkpoints", "2")).is_dir()
