"""launch/job.sh on this machine (a real detached process) and launch/worker_setup.sh's dry run."""
import os
import pathlib
import shlex
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]


def job(jobs, *args, check=True):
    proc = subprocess.run(["bash", "launch/job.sh", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, MARVAL_JOBS=str(jobs)))
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def wait_for(pred, what, limit=30.0):
    """Poll until pred() holds; the generous limit only stops a hung test."""
    end = time.monotonic() + limit
    while not pred():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.1)


# A stand-in for the training loop's signal handling: on SIGTERM it "checkpoints" and exits 0.
PROGRAM = ("import signal, sys, time\n"
           "def term(*_):\n    print('SIGTERM: checkpoint saved', flush=True); sys.exit(0)\n"
           "signal.signal(signal.SIGTERM, term); print('step 1', flush=True); time.sleep(120)\n")


def test_job_start_status_stop_forwards_sigterm(tmp_path):
    jobs = tmp_path / "jobs"
    out = job(jobs, "start", "r1", sys.executable, "-c", PROGRAM).stdout
    assert "r1: started" in out
    wait_for(lambda: "step 1" in (jobs / "r1.log").read_text(), "the program to start")
    assert job(jobs, "status", "r1").stdout.endswith("r1: running\n")
    assert "already running" in job(jobs, "start", "r1", "true").stdout   # not started twice
    assert "SIGTERM sent" in job(jobs, "stop", "r1").stdout
    wait_for(lambda: "running" not in job(jobs, "status", "r1").stdout, "the job to end", limit=60)
    # the program itself got the signal (not only its wrapper) and its exit status was recorded
    assert "SIGTERM: checkpoint saved" in (jobs / "r1.log").read_text()
    assert (jobs / "r1.rc").read_text().strip() == "0"
    assert job(jobs, "status", "r1").stdout.endswith("r1: stopped\n")
    assert (jobs / "r1.stopped").exists()          # a boot script would not start it again
    # a new start clears the stop mark; logs exits with the job's status
    job(jobs, "start", "r1", "bash", "-c", "echo done; exit 3")
    logs = job(jobs, "logs", "r1", check=False)
    assert logs.returncode == 3 and "done" in logs.stdout and logs.stdout.endswith("r1: exit 3\n")
    assert not (jobs / "r1.stopped").exists()
    bad = job(jobs, "status", "../x", check=False)
    assert bad.returncode == 2 and "run name" in bad.stderr


def test_job_systemd_unit_dry_run(tmp_path):
    out = job(tmp_path, "--dry-run", "start", "--systemd", "distill-huge", "/opt/v/bin/python", "-m",
              "marval_jax.main", "--workdir=gs://b/w").stdout
    (line,) = out.splitlines()
    argv = shlex.split(line[2:])
    assert argv[0] == "systemd-run" and "--unit=marval-distill-huge.service" in argv
    assert f"--setenv=JAX_COMPILATION_CACHE_DIR={tmp_path}/jax_cache" in argv   # the unit's compiles are cached
    for prop in ["Restart=on-failure", "RestartPreventExitStatus=2", "KillMode=mixed", "TimeoutStopSec=600",
                 f"StandardOutput=append:{tmp_path}/distill-huge.log"]:
        assert f"--property={prop}" in argv, prop
    i = argv.index("bash")
    assert argv[i + 1] == "-c" and argv[i + 3] == f"{tmp_path}/distill-huge.rc"
    assert argv[i + 4:] == ["/opt/v/bin/python", "-m", "marval_jax.main", "--workdir=gs://b/w"]
    assert not tmp_path.joinpath("distill-huge.log").exists(), "a dry run starts nothing"


# Compiles one program and prints the persistent compilation cache's directory and its hits (jax.monitoring).
CACHED_PROGRAM = ("import os, jax, jax.numpy as jnp\n"
                  "hits = []\n"
                  "jax.monitoring.register_event_listener(lambda n, **k: hits.append(n) if 'cache_hits' in n else None)\n"
                  "jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()\n"
                  "print('cache', os.environ.get('JAX_COMPILATION_CACHE_DIR'), 'hits', len(hits), flush=True)\n")


def test_job_gives_the_program_a_compilation_cache_that_a_restart_hits(tmp_path, monkeypatch):
    """A job's programs are cached in $MARVAL_JOBS/jax_cache: the second start of the same program loads them
    (cache hits) instead of compiling; JAX_COMPILATION_CACHE_DIR=off runs without one, even when the caller's
    environment holds "off" (it must not become a directory of that name)."""
    jobs = tmp_path / "jobs"
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")   # cache even this tiny program
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    for expected_hits in (0, 1):
        job(jobs, "start", "c", sys.executable, "-c", CACHED_PROGRAM)
        logs = job(jobs, "logs", "c", check=False)
        assert logs.returncode == 0, logs.stdout[-2000:]
        line = [x for x in logs.stdout.splitlines() if x.startswith("cache ")][-1]
        words = line.split()
        assert words[1] == f"{jobs}/jax_cache" and (int(words[3]) > 0) == bool(expected_hits), line
    assert any((jobs / "jax_cache").iterdir())
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "off")
    job(jobs, "start", "d", sys.executable, "-c", CACHED_PROGRAM)
    logs = job(jobs, "logs", "d", check=False)
    assert "cache None hits 0" in logs.stdout, logs.stdout[-2000:]
    assert not (ROOT / "off").exists()
    out = job(jobs, "--dry-run", "start", "--systemd", "e", "true").stdout
    assert "--setenv=JAX_COMPILATION_CACHE_DIR" not in out   # off: nothing set in the unit


def test_worker_setup_dry_run_builds_the_venv_on_uvs_python(tmp_path):
    venv = tmp_path / "venv"
    env = dict(os.environ, MARVAL_VENV=str(venv), MARVAL_UV_DIR=str(tmp_path / "uv"))
    run = lambda *a, **kw: subprocess.run(["bash", "launch/worker_setup.sh", "--dry-run", *a], cwd=ROOT,  # noqa
                                          env=dict(env, **kw), capture_output=True, text=True, timeout=60)
    proc = run("tpu")
    assert proc.returncode == 0, proc.stderr
    cmds = [shlex.split(l[2:]) for l in proc.stdout.splitlines() if l.startswith("+ ")]
    assert cmds[0] == ["python3", "-m", "pip", "install", "-q", "--upgrade", "--target", str(tmp_path / "uv"),
                       "uv==0.13.8"]
    assert cmds[1] == [str(tmp_path / "uv/bin/uv"), "venv", "--clear", "--seed", "--managed-python", "--python",
                       "3.11.18", str(venv)]
    assert cmds[3][-1] == "jax[tpu]==0.10.2" and f"PIP_CONSTRAINT={ROOT}/launch/constraints.txt" in cmds[3]
    assert cmds[4][-2:] == ["bash", "launch/setup_env.sh"] and f"PYTHON={venv}/bin/python" in cmds[4]
    assert not venv.exists(), "a dry run creates nothing"
    # a venv on another interpreter (here this machine's python) is rebuilt, and says so
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    proc = run("cuda", MARVAL_JAX_VERSION="0.11.2")
    have = "%d.%d.%d" % sys.version_info[:3]
    assert f"runs Python {have}, not 3.11.18: rebuilding it" in proc.stdout
    assert "'jax[cuda12]==0.11.2'" in proc.stdout
    proc = run("gpu")
    assert proc.returncode == 2 and "usage" in proc.stderr
