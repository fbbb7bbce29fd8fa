"""launch/run_local.sh --processes=2: every line is prefixed with its process id, and the launcher's exit status
is a failing process's (here both refuse a bad config after forming the process group: a user error, exit 2)."""
import os
import re
import signal

from launcher import LAUNCHER, launch


def test_failing_processes_fail_the_launcher_with_their_status(tmp_path):
    run = launch("train", "configs/mar.py:tiny", tmp_path / "w", ["--config.train.num_steps=0"],
                 launcher_args=("--grace=300",))  # the slower one is not killed before it fails by itself
    assert run.returncode == 2, run.text()[-3000:]
    assert sorted(run.pids) == [0, 1]
    for p in (0, 1):
        assert any(line.startswith("error: train.num_steps=0") for line in run.of(p)), run.text()[-3000:]
        assert any(f"# process {p} (pid {run.pids[p]}) exited with status 2" in line for line in run.lines)


def test_sigterm_to_the_launcher_reaches_every_process(tmp_path):
    """Both processes wait in jax.distributed.initialize for a third that never comes (num_processes=3 overrides
    the launcher's 2); a SIGTERM to the launcher, once both have logged that they initialise, is passed to both
    (they end by the signal: nothing of ours handles it yet) and the launcher exits with their status, leaving no
    process behind."""
    started = set()

    def on_line(line, pids):
        m = re.match(r"\[(\d)\] .*jax\.distributed\.initialize\(", line)
        if m:
            started.add(int(m.group(1)))
            if started == {0, 1}:
                os.kill(LAUNCHER[0].pid, signal.SIGTERM)

    LAUNCHER.clear()
    run = launch("train", "configs/mar.py:tiny", tmp_path / "w", ["--config.mesh.num_processes=3"],
                 on_line=on_line, launcher_args=("--grace=300",))
    assert started == {0, 1}, run.text()[-3000:]
    assert any("launcher got SIGTERM: passing SIGTERM to processes" in line for line in run.lines), run.text()
    for p in (0, 1):
        assert any(f"# process {p} (pid {run.pids[p]}) exited with status 143" in line for line in run.lines), \
            run.text()[-3000:]
        assert not _alive(run.pids[p])
    assert run.returncode == 143


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
