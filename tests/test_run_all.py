"""tests/run_all.sh: all three parts run whatever the others give, and the script fails if any failed.

Driven with a stand-in `python` on PATH that records each pytest call and exits with a chosen status, so the
script's own control flow is what is tested (not the suite)."""
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).parent / "run_all.sh"


def _run(tmp_path, main_rc, multi_rc, proc_rc):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.log"
    fake = bindir / "python"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {log}
case "$*" in *--ignore*) exit {main_rc};; *tests/multidevice*) exit {multi_rc};; *tests/multiprocess*) exit {proc_rc};; esac
exit 99
""")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    return proc.returncode, log.read_text().splitlines()


@pytest.mark.parametrize("main_rc,multi_rc,proc_rc,ok", [
    (0, 0, 0, True), (1, 0, 0, False), (0, 1, 0, False), (0, 0, 1, False), (5, 0, 0, False), (0, 5, 0, False),
    (0, 0, 5, False), (1, 1, 0, False)])
def test_every_part_runs_and_any_failure_fails(tmp_path, main_rc, multi_rc, proc_rc, ok):
    rc, calls = _run(tmp_path, main_rc, multi_rc, proc_rc)
    assert len(calls) == 3, calls                      # the later parts ran even when an earlier one failed
    assert "--ignore=tests/multidevice" in calls[0] and "--ignore=tests/multiprocess" in calls[0]
    assert calls[1].split()[-1] == "tests/multidevice" and calls[2].split()[-1] == "tests/multiprocess"
    assert (rc == 0) == ok, (rc, main_rc, multi_rc, proc_rc)


def test_the_main_part_takes_the_slow_files_first():
    """The main part keeps the collection order (xdist would reorder files by their number of tests), and every
    file tests/conftest.py schedules first exists (a renamed file would silently fall back to the end)."""
    from tests import conftest
    assert "--no-loadscope-reorder" in SCRIPT.read_text()
    missing = [f for f in conftest.SLOW_FIRST if not (SCRIPT.parent / f).is_file()]
    assert not missing, missing
    assert len(set(conftest.SLOW_FIRST)) == len(conftest.SLOW_FIRST)


def test_slow_files_are_collected_first():
    """A SLOW_FIRST file named last on the command line is collected before a file that is not in the list."""
    from tests import conftest
    assert "models/test_gelu.py" not in conftest.SLOW_FIRST
    root = SCRIPT.parent.parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests/models/test_gelu.py", "tests/train/test_distill_checkpoint.py"],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(root)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = [line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line]
    assert files[0] == "tests/train/test_distill_checkpoint.py", files
    assert files[-1] == "tests/models/test_gelu.py" and set(files) == {files[0], files[-1]}, files


def test_the_compile_cache_reaches_this_process_and_its_subprocesses(compile_cache):
    """tests/conftest.py's compile_cache: JAX's config and the environment name its folder, and a compile is
    written there (the one-second threshold lowered for this tiny program)."""
    import jax
    assert jax.config.jax_compilation_cache_dir == compile_cache
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == compile_cache
    before = set(os.listdir(compile_cache))
    threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        jax.jit(lambda x: x * 7 - 2)(jax.numpy.arange(3.0)).block_until_ready()
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)
    assert any(f.endswith("-cache") for f in set(os.listdir(compile_cache)) - before), os.listdir(compile_cache)
