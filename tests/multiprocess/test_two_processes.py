"""Two processes x 4 CPU devices (one program, joined by jax.distributed over localhost, gloo collectives) train
tiny MAR with FSDP across both processes (mesh data=1, fsdp=8) and agree with one process x 8 devices: the loss
curve, a preemption (SIGTERM to process 1 alone at a random step) and its resume, the sample grid, `--mode evaluate`;
distill and rl run 2 steps each on the two processes.

Two launches in all (module fixtures), running at the same time, each one process group running its stages back
to back (tests/multiprocess/pipeline.py: one `jax.distributed.initialize`, one import):
* reference, 1 x 8: train 10 steps (grid at step 10); export its EMA weights as an orbax params checkpoint (written
  by this one process, its arrays saved replicated over its 8 devices); `--mode evaluate` of that export.
* pod, 2 x 4: train, preempted by a SIGTERM to process 1 alone once process 0 has logged a random step r in 1..6;
  the resume of that workdir to step 10; a wait for the reference's export (its model.json, written last);
  `--mode evaluate` of that export (a params checkpoint written
  under another process/device topology: checkpoints/params_io restores it into the current shardings); 2 distill
  steps with this run as teacher; 2 rl steps with that student.
Every process of the pod launch reports each file it writes outside orbax's array writes (pipeline.py's audit hook,
`# wrote PATH`): process 1 may write only its checkpoint parts.

Evaluation. Both launches evaluate the same parameters (the export), on the same 8-device mesh with the batch split
8 ways: sampling, Inception and classifier compute each row on one device with replicated weights, so the two
layouts run the same per-row arithmetic and may differ only in the order a kernel adds its terms. The features then
agree within the Inception chain's reassociation bound relative to their scale, r = reassociation_atol(inception
depth, 1) (numerics.py; ~2.9e-4), and the FID, quadratic in the features, within rtol = 2 r. The reference
statistics are those of 16 real test images (a raw folder of 16 images: `data.raw_dir`), computed split over the
devices and cached by process 0; precision / recall use the same 16. Precision and recall count samples / real
images inside a k-NN ball: a feature change of r can move only a sample at a tie across a ball's edge, so they agree
within one of 16 (1/16). The class accuracy counts argmax predictions of the classifier: equal. The evaluation
grids follow the grid rule below.

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

import gzip
import json
import os
import pathlib
import random
import re
import signal
import threading

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
NUM_REAL = 16
SIGNAL_AT = random.SystemRandom().randint(1, STEPS - 4)  # the step process 0 logs before process 1 is signalled
STAGES = ("train", "train", "wait", "evaluate", "distill", "rl")  # the pod launch's stages, in order
EVALUATE, DISTILL, RL = (STAGES.index(m) for m in ("evaluate", "distill", "rl"))


def _inception_depth() -> int:
    from marval_jax.evaluation import inception
    units = inception.conv_units(inception.FIDInceptionV3())
    return sum(int(np.prod(u.weight[...].shape[:3])) + 3 + ULP_TRANSCENDENTAL for _, u in units) + 7 + 9 * 11 + 64


def _raw_folder(path: pathlib.Path) -> str:
    """A Fashion-MNIST raw folder whose test split is the installed one's first NUM_REAL images (IDX files); the
    train files are the installed ones."""
    from marval_jax.data.raw_datasets import FASHION_MNIST_DIR, _FMNIST_FILES, load_raw
    path.mkdir()
    images, labels = load_raw("fashion_mnist", "test")
    for name, arr in zip(_FMNIST_FILES["test"], (images[:NUM_REAL], labels[:NUM_REAL].astype(np.uint8))):
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        with gzip.open(path / name, "wb") as f:
            f.write(header + arr.tobytes())
    for name in _FMNIST_FILES["train"]:
        os.symlink(os.path.join(FASHION_MNIST_DIR, name), path / name)
    return str(path)


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory):
    """The converted FID Inception and a raw folder of 16 real test images."""
    pytest.importorskip("torch")
    from marval_jax.tools.convert_inception import convert
    tmp = tmp_path_factory.mktemp("eval_inputs")
    return {"inception": convert(str(tmp / "inception.npz")), "raw": _raw_folder(tmp / "raw"), "tmp": tmp}


def _evaluate_stage(inputs, workdir, source):
    return ["evaluate", "configs/mar.py:tiny", workdir,
            MESH + ["--config.sample.num_images=16", "--config.sample.batch_size=16", "--config.sample.crop=28",
                    "--config.sample.fid_ref=raw:fashion_mnist/test", f"--config.data.raw_dir={inputs['raw']}",
                    f"--config.sample.inception={inputs['inception']}", f"--config.sample.pr_num_real={NUM_REAL}",
                    f"--config.init_from={source}", f"--out={pathlib.Path(workdir) / 'eval'}"]]


class _Background:
    """`fn()` in a thread (a launch that runs while another does); `get()` waits for its result."""

    def __init__(self, fn):
        self.result, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.result = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised by get()
            self.error = e

    def get(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture(scope="module")
def reference_started(tmp_path_factory, eval_inputs):
    """One process x 8 devices, started in the background: train uninterrupted, export the EMA weights, evaluate
    the export."""
    workdir = tmp_path_factory.mktemp("one_process")
    export = workdir / "export"
    job = _Background(lambda: launch(
        "train", "configs/mar.py:tiny", workdir, RUN, processes=1, devices=DEVICES,
        then=[["export", "configs/mar.py:tiny", workdir, [f"--out={export}"]],
              _evaluate_stage(eval_inputs, workdir, export)], tmp=eval_inputs["tmp"],
        log=workdir.parent / "one_process.log"))
    return {"workdir": workdir, "export": export, "job": job}


@pytest.fixture(scope="module")
def reference(reference_started):
    """The finished reference launch (tests name `pod` before it, so the pod runs while the reference does, whichever
    tests are selected)."""
    run = reference_started["job"].get()
    assert run.returncode == 0, run.text()[-4000:]
    return reference_started


@pytest.fixture(scope="module")
def pod(tmp_path_factory, eval_inputs, reference_started):
    """Two processes x 4 devices, one process group: train (SIGTERM to process 1 alone once process 0 has logged
    step SIGNAL_AT), resume, evaluate the reference's export, distill 2 steps, rl 2 steps."""
    workdir = tmp_path_factory.mktemp("two_processes")
    sent = []

    def on_line(line, pids):
        if not sent and re.match(rf"\[0\] \[\s*{SIGNAL_AT}\] ", line):
            os.kill(pids[1], signal.SIGTERM)
            sent.append(pids[1])

    steps = ["--config.train.num_steps=2", "--config.train.sample_every=0", "--config.train.ckpt_every=2"]
    then = [["train", "configs/mar.py:tiny", workdir, RUN],
            ["wait", str(reference_started["export"] / "model.json"), workdir, []],
            _evaluate_stage(eval_inputs, workdir, reference_started["export"]),
            ["distill", "configs/marval.py:tiny", workdir / "distill",
             TINY + steps + [f"--config.teacher_ckpt={workdir}"]],
            ["rl", "configs/marval_rl.py:tiny", workdir / "rl",
             TINY + steps + [f"--config.student_ckpt={workdir / 'distill'}"]]]
    run = launch("train", "configs/mar.py:tiny", workdir, RUN, on_line=on_line, then=then, tmp=eval_inputs["tmp"],
                 env={"MARVAL_WATCH_WRITES": str(workdir),
                      # the resume compiles the preempted run's programs again: read them from JAX's cache
                      "JAX_COMPILATION_CACHE_DIR": str(workdir.parent / "jax_cache_two_processes")},
                 log=workdir.parent / "two_processes.log")
    assert sent, f"signal at step {SIGNAL_AT}: " + run.text()[-4000:]
    return workdir, run


def _stage(run, process: int, i: int) -> list[str]:
    """Process `process`'s output lines of stage i (between its '# stage i: ... start' and the next stage's)."""
    out, inside = [], False
    for line in run.of(process):
        m = re.match(r"# stage (\d+): \w+ start", line)
        if m:
            inside = int(m.group(1)) == i
        elif inside:
            out.append(line)
    return out


def _done(run, process: int, i: int) -> bool:
    return any(f"# stage {i}: {STAGES[i]} done, exit 0" in line for line in run.of(process))


def _stop_step(lines) -> int | None:
    found = [int(m.group(1)) for line in lines for m in [re.search(r"preempted at step (\d+)", line)] if m]
    return found[0] if found else None


def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(pod):
    workdir, run = pod
    assert run.returncode == 0, run.text()[-4000:]
    assert _done(run, 0, 0) and _done(run, 1, 0), run.text()[-4000:]        # both exit the preempted run with 0
    k0, k1 = _stop_step(_stage(run, 0, 0)), _stop_step(_stage(run, 1, 0))
    assert k0 is not None and k0 == k1, (SIGNAL_AT, k0, k1, run.text()[-4000:])
    assert SIGNAL_AT <= k0 < STEPS, (SIGNAL_AT, k0)             # stopped by the signal, not by the end of the run
    step_dir = pathlib.Path(workdir, "checkpoints", str(k0))
    assert (step_dir / "commit_success.txt").exists() or (step_dir / "_CHECKPOINT_METADATA").exists()
    # every process saved its part: both data iterator states are in the checkpoint
    assert sorted(p.name for p in (step_dir / "data").glob("process_*.json")) == \
        ["process_0-of-2.json", "process_1-of-2.json"]
    assert sorted(int(p.name) for p in pathlib.Path(workdir, "checkpoints").iterdir() if p.name.isdigit()) == \
        [k0, STEPS]                                              # the stop step, then the resumed run's last
    for p in (0, 1):
        assert any(f"resumed from step {k0}" in line for line in _stage(run, p, 1)), run.text()[-4000:]


def test_resume_on_two_processes_gives_the_one_process_loss_curve(pod, reference):
    workdir, run = pod
    assert _done(run, 0, 1) and _done(run, 1, 1), run.text()[-4000:]
    ref, got = losses(reference["workdir"]), losses(workdir)
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=RTOL, atol=0)


def test_only_process_zero_writes_files(pod):
    """Metrics, grids, evaluation outputs: process 0 alone; process 1 writes only its parts of checkpoints."""
    workdir, run = pod
    rows = [json.loads(line) for line in pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines() if line]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))   # one row per step: one writer
    assert not any(re.match(r"\[\s+\d+\] ", line) for line in run.of(1))  # process 1 prints no metrics
    assert any(re.match(r"\[\s+\d+\] ", line) for line in run.of(0))
    wrote = {p: [line[len("# wrote "):] for line in run.of(p) if line.startswith("# wrote ")] for p in (0, 1)}
    runs = [pathlib.Path(workdir, *sub) for sub in ((), ("distill",), ("rl",))]
    checkpoints = tuple(str(run_dir / "checkpoints") for run_dir in runs)
    # every process may make a run's folder and writes its part of each checkpoint; nothing else
    assert not [w for w in wrote[1] if not w.startswith(checkpoints) and w not in map(str, runs)], wrote[1]
    assert any(w.startswith(str(workdir / "checkpoints")) for w in wrote[1])  # the hook saw its checkpoint part
    for name in ("metrics.jsonl", GRID, f"eval/{EVAL_TAG}.json", f"eval/{EVAL_TAG}.png", "distill/metrics.jsonl"):
        assert str(pathlib.Path(workdir, name)) in wrote[0], (name, wrote[0][-20:])


def test_grid_on_two_processes_is_the_one_process_grid(pod, reference):
    """Every process enters the jitted sampler (the state is sharded over both): with process 0 alone the step-10
    grid hangs the resumed run (killed by the hang guard)."""
    workdir, run = pod
    assert _done(run, 0, 1) and _done(run, 1, 1), run.text()[-4000:]
    a = np.asarray(Image.open(pathlib.Path(reference["workdir"], GRID))).astype(int)
    b = np.asarray(Image.open(pathlib.Path(workdir, GRID))).astype(int)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1
    assert (a != b).mean() <= 255 * RTOL


def test_evaluate_on_two_processes_gives_the_one_process_fid_and_grid(pod, reference):
    """--mode evaluate of one params checkpoint (written by 1 process x 8 devices) split over 2 processes x 4
    devices (each samples 2 of every 16 images, Inception and classifier where the images are, features gathered)
    gives the 1 x 8 numbers; process 0 alone writes and prints the report."""
    workdir, run = pod
    assert _done(run, 0, EVALUATE) and _done(run, 1, EVALUATE), run.text()[-4000:]
    one = json.loads(pathlib.Path(reference["workdir"], "eval", f"{EVAL_TAG}.json").read_text())
    two = json.loads(pathlib.Path(workdir, "eval", f"{EVAL_TAG}.json").read_text())
    assert one["source"] == two["source"] == str(reference["export"])
    assert (one["processes"], one["devices"], two["processes"], two["devices"]) == (1, 8, 2, 8)
    assert one["num_images"] == two["num_images"] == 16
    rtol = 2 * reassociation_atol(_inception_depth(), 1.0)
    assert abs(two["fid"] - one["fid"]) <= rtol * abs(one["fid"]), (one["fid"], two["fid"], rtol)
    assert two["class_accuracy"] == one["class_accuracy"]
    for k in ("precision", "recall"):
        assert abs(two[k] - one[k]) <= 1 / NUM_REAL, (k, one[k], two[k])
    a = np.asarray(Image.open(pathlib.Path(reference["workdir"], "eval", f"{EVAL_TAG}.png"))).astype(int)
    b = np.asarray(Image.open(pathlib.Path(workdir, "eval", f"{EVAL_TAG}.png"))).astype(int)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1 and (a != b).mean() <= 255 * RTOL
    # the report line is printed by the writer only
    assert any(line.startswith("{") and '"fid"' in line for line in _stage(run, 0, EVALUATE))
    assert not any(line.startswith("{") and '"fid"' in line for line in _stage(run, 1, EVALUATE))


def test_distill_and_rl_run_two_steps_on_two_processes(pod):
    workdir, run = pod
    for p in (0, 1):
        assert _done(run, p, DISTILL) and _done(run, p, RL), run.text()[-4000:]
    for sub in ("distill", "rl"):
        assert (pathlib.Path(workdir, sub, "checkpoints", "2")).is_dir()
