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


def test_dry_run_of_every_mode_passes_the_process_group_fields(tmp_path):
    """evaluate and demo start on every process like train (demo's config has a `mesh` section for them); the
    process-group arguments are names cache_latents accepts too (its aliases of --coordinator_address, ...)."""
    import subprocess
    from absl import flags
    from launcher import ROOT
    from marval_jax.tools import cache_latents
    for mode, config in (("evaluate", "configs/mar.py:tiny"), ("demo", "configs/demo.py"),
                         ("sample", "configs/marval.py:tiny")):
        out = subprocess.run(["bash", str(ROOT / "launch" / "run_local.sh"), "--dry-run", "--processes=2",
                              "--devices_per_process=4", "--port=4321", f"--mode={mode}", f"--config={config}",
                              f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr
        cmds = [line for line in out.stdout.splitlines() if line.startswith("+ [")]
        assert len(cmds) == 2, out.stdout
        for i, cmd in enumerate(cmds):
            assert f"-m marval_jax.main --mode={mode} --config={config}" in cmd, cmd
            group = [a for a in cmd.split() if a.startswith("--config.mesh.")]
            assert group == ["--config.mesh.coordinator_address=localhost:4321", "--config.mesh.num_processes=2",
                             f"--config.mesh.process_id={i}"], cmd
            fv = cache_latents.define_flags(flags.FlagValues())
            fv(["cache_latents", *group])
            assert (fv.coordinator_address, fv.num_processes, fv.process_id) == ("localhost:4321", 2, i)
    bad = subprocess.run(["bash", str(ROOT / "launch" / "run_local.sh"), "--dry-run", "--mode=export",
                          "--config=configs/mar.py:tiny", f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True,
                         text=True, check=False)
    assert bad.returncode != 0 and "--mode must be train, distill, rl, sample, evaluate or demo" in bad.stderr
