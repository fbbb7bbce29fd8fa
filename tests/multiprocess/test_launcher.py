"""launch/run_local.sh --processes=2: every line is prefixed with its process id, and the launcher's exit status
is a failing process's (here both refuse a bad config after forming the process group: a user error, exit 2)."""
from launcher import launch


def test_failing_processes_fail_the_launcher_with_their_status(tmp_path):
    run = launch("train", "configs/mar.py:tiny", tmp_path / "w", ["--config.train.num_steps=0"],
                 launcher_args=("--grace=300",))  # the slower one is not killed before it fails by itself
    assert run.returncode == 2, run.text()[-3000:]
    assert sorted(run.pids) == [0, 1]
    for p in (0, 1):
        assert any(line.startswith("error: train.num_steps=0") for line in run.of(p)), run.text()[-3000:]
        assert any(f"# process {p} (pid {run.pids[p]}) exited with status 2" in line for line in run.lines)
