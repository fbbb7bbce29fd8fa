"""Launch N local processes of one program (the pod code path) through launch/run_local.sh and read their output.

Each process is a real `python -m marval_jax.main` with its own forced CPU devices, joined by
`jax.distributed.initialize` over a localhost coordinator (gloo collectives): the code that runs on a TPU pod's
hosts, on one machine. Run as its own part of tests/run_all.sh (a process group cannot be formed inside pytest's
own process, whose JAX backend may already have started)."""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parents[2]
# a process group that deadlocks is killed and fails the test (a hang guard, not a timing assert)
HANG_GUARD_S = float(os.environ.get("MARVAL_MULTIPROCESS_HANG_S", 600))

LAUNCHER: list = []  # the running launcher's Popen (an on_line callback may signal it)

# XLA's CPU backend with LLVM's cheap pipeline: these runs compile more than they compute (a few steps of tiny
# models), and compilation is what the 2-core budget pays for. Every launch of the suite compiles with the same
# flags, so the comparisons (1 x 8 against 2 x 4) are between programs built alike.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

TINY = ["--config.mesh.shape.data=1", "--config.mesh.shape.fsdp=-1", "--config.train.log_every=1"]


class Launch:
    """One launcher run: its exit status, its output lines, the pid of each process."""

    def __init__(self, returncode: int, lines: list[str], pids: dict[int, int]):
        self.returncode, self.lines, self.pids = returncode, lines, pids

    def of(self, process: int) -> list[str]:
        return [line[len(f"[{process}] "):] for line in self.lines if line.startswith(f"[{process}] ")]

    def text(self) -> str:
        return "\n".join(self.lines)


def launch(mode: str, config: str, workdir, overrides: list[str], *, processes: int = 2, devices: int = 4,
           on_line: Callable[[str, dict], None] | None = None, launcher_args: tuple[str, ...] = (),
           then: list | None = None, tmp=None, env: dict | None = None, log=None) -> Launch:
    """bash launch/run_local.sh --processes=P --devices_per_process=D ...; `on_line(line, pids)` sees each line as
    it comes (to signal a process at a given step). `then`: further stages [mode, config, workdir, [overrides]]
    each process runs after the first in the same process group (pipeline.py; `tmp` holds its wrapper); `env`:
    further environment variables of the processes; `log`: a file that gets every line with the seconds since the
    start (where the time goes)."""
    cmd = ["bash", str(ROOT / "launch" / "run_local.sh"), f"--processes={processes}",
           f"--devices_per_process={devices}", *launcher_args, f"--mode={mode}", f"--config={config}",
           f"--workdir={workdir}", "--", *overrides]
    extra_env = env
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), PYTHON=sys.executable)
    env["XLA_FLAGS"] = FAST_COMPILE
    env.update(extra_env or {})
    if then:
        env.update(PYTHON=pipeline_python(tmp), MARVAL_PIPELINE=json.dumps([[m, c, str(w), o] for m, c, w, o in then]))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    LAUNCHER[:] = [proc]
    lines, pids = [], {}
    timer = _HangGuard(proc)
    start = time.monotonic()
    log_file = open(log, "w", encoding="utf-8") if log else None  # pylint: disable=consider-using-with
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if log_file:
                log_file.write(f"{time.monotonic() - start:7.1f} {line}\n")
                log_file.flush()
            m = re.match(r"# process (\d+): pid (\d+)", line)
            if m:
                pids[int(m.group(1))] = int(m.group(2))
            if on_line is not None:
                on_line(line, pids)
        rc = proc.wait()
    finally:
        timer.cancel()
        if log_file:
            log_file.close()
    return Launch(rc, lines, pids)


def pipeline_python(tmp) -> str:
    """An executable standing in for python in run_local.sh that runs pipeline.py (the stages of $MARVAL_PIPELINE)."""
    path = pathlib.Path(tmp) / "pipeline_python"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "multiprocess" / "pipeline.py"}" "$@"\n')
    path.chmod(0o755)
    return str(path)


class _HangGuard:
    def __init__(self, proc):
        import threading
        self.timer = threading.Timer(HANG_GUARD_S, lambda: os.killpg(proc.pid, signal.SIGKILL))
        self.timer.daemon = True
        self.timer.start()

    def cancel(self):
        self.timer.cancel()


def losses(workdir) -> dict[int, float]:
    """step -> loss of <workdir>/metrics.jsonl (a resumed run's rows past its checkpoint were dropped)."""
    rows = [json.loads(line) for line in pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r["loss"] for r in rows}
