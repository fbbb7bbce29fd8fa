"""Launch scripts: their dry runs print the exact commands (one per line, "+ " prefixed) and run none of them.

A fake `gcloud` first on PATH records every call: a dry run must leave no record. The pod launch checked is
MARVAL-H GSIM distillation (configs/marval.py:huge) on a v5p-256 queued resource.
"""
import json
import os
import pathlib
import shlex
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
POD = ["--name=marval-h", "--zone=us-east5-a", "--project=my-proj", "--accelerator=v5p-256", "--spot",
       "--mode=distill", "--config=configs/marval.py:huge", "--workdir=gs://bucket/marval_huge"]
MAIN_EXTRA = ["--", "--config.teacher_ckpt=gs://bucket/mar_huge"]


@pytest.fixture()
def fake_gcloud(tmp_path):
    """PATH with a `gcloud` (and `xpk`) that appends its arguments to calls.txt. Describes answer with the resource's
    state: $FAKE_STATE at first, empty (absent) after a delete, $FAKE_CREATED (default ACTIVE) after a create;
    `xpk workload list` answers the same way."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    script = bin_dir / "gcloud"
    state = tmp_path / "state"
    script.write_text('#!/usr/bin/env bash\necho "$*" >> "%s"\n'
                      '[ -n "${FAKE_STATE:-}" ] && [ ! -e "%s" ] && echo "$FAKE_STATE" > "%s"\n'
                      'case "$*" in *describe*|"workload list "*) [ -s "%s" ] && cat "%s" && exit 0; exit 1;;\n'
                      '  *" delete "*) : > "%s";; *" create "*) echo "${FAKE_CREATED:-ACTIVE}" > "%s";;\n'
                      'esac\n' % ((calls,) + (state,) * 6))
    script.chmod(0o755)
    for tool in ("xpk",):  # the same recorder for the other CLIs the launchers call
        (bin_dir / tool).symlink_to(script)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, calls


def run(script, args, env_extra, check=True):
    env = dict(os.environ, **env_extra)
    proc = subprocess.run(["bash", f"launch/{script}", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def commands(stdout):
    """The '+ ' lines as argument lists (they are shell-quoted, so shlex gives the exact argv)."""
    out = []
    for line in stdout.splitlines():
        if line.startswith("+ "):
            text = line[2:].split(" > ")[0] if "batch_spec.py" in line else line[2:]
            text = text.split(" 2>&1 | tee")[0]
            out.append(shlex.split(text))
        else:
            assert line.startswith("#"), f"a dry run prints only '+ ' commands and '# ' notes, got {line!r}"
    return out


def index(cmds, pred, what):
    hits = [i for i, c in enumerate(cmds) if pred(c)]
    assert hits, f"no command {what} in:\n" + "\n".join(" ".join(c) for c in cmds)
    return hits[0]


def remote(cmd):
    """argv of the --command= of a `gcloud ... ssh` command."""
    arg = next(a for a in cmd if a.startswith("--command="))
    return shlex.split(arg[len("--command="):].replace("~/", "HOME/"))


def shown_file(stdout, name):
    """The text of a file a dry run shows between '# --- NAME...' and '# --- end NAME ---' markers."""
    lines = stdout.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"# --- {name}"))
    end = lines.index(f"# --- end {name} ---", start)
    return "\n".join(l[2:] for l in lines[start + 1:end])


def test_tpu_pod_dry_run_marval_huge(fake_gcloud):
    """--start=boot (default): a startup-script that runs the job script at each boot, the code and the job script
    on GCS, the job started as a systemd unit through that same script, logs/status from /var/lib/marval_jobs."""
    env, calls = fake_gcloud
    proc = run("tpu_vm.sh", ["--dry-run", *POD, *MAIN_EXTRA], env)
    cmds = commands(proc.stdout)
    assert not calls.exists(), "a dry run called gcloud"
    loc = ["--zone=us-east5-a", "--project=my-proj"]

    i_desc = index(cmds, lambda c: c[:5] == ["gcloud", "compute", "tpus", "queued-resources", "describe"],
                   "describing the queued resource")
    i_create = index(cmds, lambda c: c[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"],
                     "creating the queued resource")
    create = cmds[i_create]
    assert create[5] == "marval-h"
    for flag in ["--node-id=marval-h", "--accelerator-type=v5p-256", "--runtime-version=v2-alpha-tpuv5", "--spot",
                 "--metadata-from-file=startup-script=/tmp/marval-marval-h-startup.sh", *loc]:
        assert flag in create, (flag, create)
    startup = shown_file(proc.stdout, "marval-marval-h-startup.sh")
    boot_uri = "gs://bucket/marval_huge/code/distill-huge.boot.sh"
    assert startup.startswith("#!/bin/bash") and f"gcloud storage cat {boot_uri}" in startup

    i_archive = index(cmds, lambda c: c[0] == "git" and "archive" in c, "packing the code")
    tar = cmds[i_archive][cmds[i_archive].index("-o") + 1]
    i_up = index(cmds, lambda c: c[:3] == ["gcloud", "storage", "cp"] and c[3] == tar, "uploading the code")
    code_uri = cmds[i_up][4]
    assert code_uri == "gs://bucket/marval_huge/code/" + os.path.basename(tar)
    i_boot = index(cmds, lambda c: c[:3] == ["gcloud", "storage", "cp"] and c[4] == boot_uri, "uploading the job")
    boot = shown_file(proc.stdout, "marval-marval-h-distill-huge.boot.sh")
    # the job script: fetch + unpack the code, set up the venv, start the unit; a stopped/finished run not at boot
    assert f"gcloud storage cp {code_uri} /tmp/" in boot
    assert "MARVAL_VENV=/opt/marval_venv bash launch/worker_setup.sh tpu" in boot
    assert ".stopped ] && {" in boot and '.rc 2>/dev/null)" = 0 ]' in boot
    start = shlex.split(boot.splitlines()[-1])
    assert start[:5] == ["MARVAL_JOBS=$JOBS", "bash", "launch/job.sh", "start", "--systemd"]
    assert start[5] == "distill-huge"
    main = start[6:]
    assert main[:3] == ["/opt/marval_venv/bin/python", "-m", "marval_jax.main"]
    for flag in ["--mode=distill", "--config=configs/marval.py:huge", "--workdir=gs://bucket/marval_huge",
                 "--config.mesh.distributed_init=True", "--config.teacher_ckpt=gs://bucket/mar_huge"]:
        assert flag in main, (flag, main)
    # the script is valid bash
    check = subprocess.run(["bash", "-n"], input=boot, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr

    ssh = lambda c: c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and c[5] == "marval-h"  # noqa: E731
    i_run = index(cmds, lambda c: ssh(c) and "--worker=all" in c and boot_uri in remote(c), "running the job script")
    r = remote(cmds[i_run])
    assert r[:4] == ["gcloud", "storage", "cp", boot_uri] and r[-4:-1] == ["sudo", "MARVAL_START=1", "bash"]
    jobsh = ["MARVAL_JOBS=/var/lib/marval_jobs", "bash", "/opt/marval_jax/launch/job.sh"]
    i_logs = index(cmds, lambda c: ssh(c) and "--worker=0" in c and remote(c) == [*jobsh, "logs", "distill-huge"],
                   "streaming the log")
    i_save = index(cmds, lambda c: ssh(c) and "--worker=all" in c and "save" in remote(c), "saving the logs")
    assert remote(cmds[i_save])[-4:] == [*jobsh[-1:], "save", "distill-huge",
                                         "gs://bucket/marval_huge/logs/distill-huge"]
    i_delete = index(cmds, lambda c: c[:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"],
                     "deleting the queued resource")
    assert {"marval-h", "--force", "--quiet", *loc} <= set(cmds[i_delete])
    assert (i_desc < i_create < i_archive < i_up < i_boot < i_run < i_logs < i_save < i_delete == len(cmds) - 1)

    # status / stop on every worker, through the same job files
    cmds = commands(run("tpu_vm.sh", ["--dry-run", *POD, "--steps=status,stop"], env).stdout)
    assert [remote(c) for c in cmds] == [[*jobsh, "status", "distill-huge"], [*jobsh, "stop", "distill-huge"]]
    assert all("--worker=all" in c for c in cmds)


def test_tpu_ssh_start_dry_run(fake_gcloud):
    """--start=ssh: the code scp'd to ~/marval_jax, worker_setup over SSH, job.sh start under nohup."""
    env, calls = fake_gcloud
    cmds = commands(run("tpu_vm.sh", ["--dry-run", *POD, "--start=ssh", *MAIN_EXTRA], env).stdout)
    assert not calls.exists()
    create = next(c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"])
    assert not any(a.startswith("--metadata") for a in create)
    ssh = lambda c: c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]  # noqa: E731
    i_scp = index(cmds, lambda c: c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"], "copying the code")
    i_setup = index(cmds, lambda c: ssh(c) and remote(c)[-2:] == ["launch/worker_setup.sh", "tpu"], "setup")
    i_run = index(cmds, lambda c: ssh(c) and "marval_jax.main" in remote(c), "starting the job")
    main = remote(cmds[i_run])
    assert main[:6] == ["cd", "marval_jax", "&&", "bash", "launch/job.sh", "start"]
    assert main[7:10] == ["HOME/marval_venv/bin/python", "-m", "marval_jax.main"]
    assert "--config.mesh.distributed_init=True" in main and "--config.teacher_ckpt=gs://bucket/mar_huge" in main
    i_logs = index(cmds, lambda c: ssh(c) and remote(c) == ["bash", "marval_jax/launch/job.sh", "logs",
                                                            "distill-huge"], "streaming the log")
    assert i_scp < i_setup < i_run < i_logs


def test_tpu_preempted_resource_is_recreated(fake_gcloud):
    """A spot queued resource found SUSPENDED (preempted) is deleted and created again with the same startup-script;
    its boot script then resumes the job from the checkpoint."""
    env, calls = fake_gcloud
    proc = run("tpu_vm.sh", [*POD, "--steps=create"], dict(env, FAKE_STATE="SUSPENDED"))
    made = calls.read_text().splitlines()
    i_del = index(made, lambda c: c.startswith("compute tpus queued-resources delete marval-h"), "deleting")
    i_new = index(made, lambda c: c.startswith("compute tpus queued-resources create marval-h"), "re-creating")
    assert i_del < i_new and "--metadata-from-file=startup-script=/tmp/marval-marval-h-startup.sh" in made[i_new]
    assert "creating it again" in proc.stdout
    calls.unlink()
    (calls.parent / "state").unlink()
    proc = run("tpu_vm.sh", [*POD, "--steps=create"], dict(env, FAKE_STATE="SUSPENDING"), check=False)
    assert proc.returncode == 2 and "SUSPENDING" in proc.stderr
    assert not any(" create " in f" {c} " or " delete " in f" {c} " for c in calls.read_text().splitlines())


def test_tpu_direct_keep_and_steps(fake_gcloud):
    env, calls = fake_gcloud
    cmds = commands(run("tpu_vm.sh", ["--dry-run", *POD, "--direct", "--keep", "--version=v2-alpha-tpuv5"],
                        env).stdout)
    create = next(c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"])
    assert "--version=v2-alpha-tpuv5" in create and "--accelerator-type=v5p-256" in create
    assert not any("delete" in c for c in cmds), "--keep must not delete"
    only_logs = commands(run("tpu_vm.sh", ["--dry-run", *POD, "--steps=logs"], env).stdout)
    assert all("create" not in c and "delete" not in c for c in only_logs)
    assert not calls.exists()


def test_tpu_existing_resource_is_reused_not_created(fake_gcloud):
    """Describe before create: an ACTIVE queued resource is reused (the fake gcloud answers the describe)."""
    env, calls = fake_gcloud
    proc = run("tpu_vm.sh", [*POD, "--steps=create"], dict(env, FAKE_STATE="ACTIVE"))
    made = calls.read_text().splitlines()
    assert any("queued-resources describe marval-h" in c for c in made)
    assert not any(" create " in f" {c} " for c in made), made
    assert "reusing" in proc.stdout


def test_tpu_bad_arguments_are_errors(fake_gcloud):
    env, _ = fake_gcloud
    proc = run("tpu_vm.sh", ["--dry-run", "--zone=z", "--accelerator=v5p-8"], env, check=False)
    assert proc.returncode == 2 and "--name is required" in proc.stderr
    proc = run("tpu_vm.sh", ["--dry-run", *POD, "--steps=create,launch"], env, check=False)
    assert proc.returncode == 2 and "unknown step launch" in proc.stderr
    proc = run("tpu_vm.sh", ["--dry-run", *POD[:4], "--workdir=/tmp/w", "--mode=train",
                             "--config=configs/mar.py:tiny"], env, check=False)
    assert proc.returncode == 2 and "--code_dir=gs://" in proc.stderr
    # tearing down needs only the name and zone
    cmds = commands(run("tpu_vm.sh", ["--dry-run", "--name=marval-h", "--zone=z", "--steps=delete"], env).stdout)
    assert cmds == [["gcloud", "compute", "tpus", "queued-resources", "delete", "marval-h", "--zone=z", "--force",
                     "--quiet"]]


def test_local_dry_run(fake_gcloud):
    env, _ = fake_gcloud
    cmds = commands(run("run_local.sh", ["--dry-run", "--mode=train", "--config=configs/mar.py:tiny",
                                         "--workdir=/tmp/mar_tiny", "--", "--config.train.num_steps=5"], env).stdout)
    assert cmds == [["env", "JAX_PLATFORMS=cpu", "python3", "-m", "marval_jax.main", "--mode=train",
                     "--config=configs/mar.py:tiny", "--workdir=/tmp/mar_tiny", "--config.train.num_steps=5"]]
    cmds = commands(run("run_local.sh", ["--dry-run", "--platform=gpu", "--gpus=0,1", "--setup", "--mode=rl",
                                         "--config=configs/marval_rl.py:base", "--workdir=gs://b/rl"],
                        dict(env, MARVAL_VENV="/opt/v")).stdout)
    assert cmds[0] == ["env", "MARVAL_VENV=/opt/v", "bash", "launch/worker_setup.sh", "cuda"]
    assert cmds[1][:4] == ["env", "JAX_PLATFORMS=cuda", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
                           "CUDA_VISIBLE_DEVICES=0,1"]
    assert cmds[1][4:] == ["/opt/v/bin/python", "-m", "marval_jax.main", "--mode=rl",
                           "--config=configs/marval_rl.py:base", "--workdir=gs://b/rl"]


def test_gcp_batch_dry_run(fake_gcloud):
    env, calls = fake_gcloud
    proc = run("gcp_batch.sh", ["--dry-run", "--project=my-proj", "--region=us-central1", "--zone=us-central1-a",
                                "--code_bucket=gs://bucket/code", "--mode=distill", "--config=configs/marval.py:base",
                                "--workdir=gs://bucket/marval_base", "--spot", *MAIN_EXTRA], env)
    cmds = commands(proc.stdout)
    assert not calls.exists()
    spec = json.loads("\n".join(l[2:] for l in proc.stdout.splitlines() if l.startswith("# ") and
                                not l.startswith("# dry run") and not l.startswith("# repeating")))
    i_up = index(cmds, lambda c: c[:3] == ["gcloud", "storage", "cp"], "uploading the code")
    i_desc = index(cmds, lambda c: c[:4] == ["gcloud", "batch", "jobs", "describe"], "describing the job")
    i_sub = index(cmds, lambda c: c[:4] == ["gcloud", "batch", "jobs", "submit"], "submitting the job")
    assert i_up < i_desc < i_sub
    sub = cmds[i_sub]
    assert {"--location=us-central1", "--project=my-proj"} <= set(sub)
    assert any(a.startswith("--config=/tmp/") and a.endswith(".json") for a in sub)
    assert any(c[:3] == ["gcloud", "logging", "read"] for c in cmds)
    policy = spec["allocationPolicy"]["instances"][0]
    assert policy["installGpuDrivers"] is True
    assert policy["policy"]["accelerators"] == [{"type": "nvidia-h200-141gb", "count": 8}]
    assert policy["policy"]["provisioningModel"] == "SPOT"
    text = spec["taskGroups"][0]["taskSpec"]["runnables"][0]["script"]["text"]
    assert "bash launch/worker_setup.sh cuda" in text
    last = shlex.split(text.splitlines()[-1])
    for flag in ["marval_jax.main", "--mode=distill", "--config=configs/marval.py:base",
                 "--workdir=gs://bucket/marval_base", "--config.teacher_ckpt=gs://bucket/mar_huge"]:
        assert flag in last
    gcs = spec["taskGroups"][0]["taskSpec"]["volumes"][0]["gcs"]["remotePath"]
    assert gcs == "bucket/code"


def test_batch_template_is_json_and_fully_filled():
    spec = subprocess.run(["python3", "launch/batch_spec.py", "--code=gs://b/c/marval_jax-x.tar.gz", "--mode=train",
                           "--config=configs/mar.py:base", "--workdir=gs://b/w", "--zone=us-central1-a",
                           "--image=us-docker.pkg.dev/p/r/marval:1"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout
    assert "@" not in spec, "unfilled placeholder"
    doc = json.loads(spec)
    runnable = doc["taskGroups"][0]["taskSpec"]["runnables"][0]
    assert runnable["container"]["imageUri"] == "us-docker.pkg.dev/p/r/marval:1"
    assert runnable["container"]["commands"][:2] == ["-m", "marval_jax.main"]


XPK = ["--cluster=marval-v5p", "--zone=us-east5-a", "--project=my-proj", "--tpu_type=v5p-256", "--mode=distill",
       "--config=configs/marval.py:huge", "--workdir=gs://bucket/marval_huge"]


def test_gke_xpk_dry_run(fake_gcloud):
    """xpk: list before create, the same entry point with distributed_init, a JobSet that restarts, wait, delete."""
    env, calls = fake_gcloud
    cmds = commands(run("gke_xpk.sh", ["--dry-run", *XPK, "--env=LIBTPU_INIT_ARGS=--xla_tpu_x=true",
                                       *MAIN_EXTRA], env).stdout)
    assert not calls.exists(), "a dry run called xpk"
    where = ["--cluster=marval-v5p", "--zone=us-east5-a", "--project=my-proj"]
    i_list = index(cmds, lambda c: c[:3] == ["xpk", "workload", "list"] and any("--filter-by-job" in a for a in c),
                   "listing the workload")
    i_create = index(cmds, lambda c: c[:3] == ["xpk", "workload", "create"], "creating the workload")
    create = cmds[i_create]
    workload = next(a for a in create if a.startswith("--workload=")).split("=", 1)[1]
    assert workload.startswith("marval-distill-huge-")
    for flag in [*where, "--tpu-type=v5p-256", "--num-slices=1", "--max-restarts=3",
                 "--base-docker-image=python:3.11-slim", "--env=LIBTPU_INIT_ARGS=--xla_tpu_x=true"]:
        assert flag in create, (flag, create)
    src = next(a for a in create if a.startswith("--script-dir=")).split("=", 1)[1]
    i_pack = index(cmds, lambda c: c[:2] == ["git", "-C"] and "archive" in c and c[-1] == src, "packing the code")
    command = shlex.split(next(a for a in create if a.startswith("--command=")).split("=", 1)[1])
    assert command[:5] == ["MARVAL_VENV=/opt/marval_venv", "bash", "launch/worker_setup.sh", "tpu", "&&"]
    assert command[5:8] == ["/opt/marval_venv/bin/python", "-m", "marval_jax.main"]
    for flag in ["--mode=distill", "--config=configs/marval.py:huge", "--workdir=gs://bucket/marval_huge",
                 "--config.mesh.distributed_init=True", "--config.teacher_ckpt=gs://bucket/mar_huge"]:
        assert flag in command, (flag, command)
    i_wait = index(cmds, lambda c: c[:3] == ["xpk", "workload", "list"] and
                   f"--wait-for-job-completion={workload}" in c, "waiting for the workload")
    i_del = index(cmds, lambda c: c[:3] == ["xpk", "workload", "delete"], "deleting the workload")
    assert {f"--workload={workload}", "--force", *where} <= set(cmds[i_del])
    assert i_pack < i_list < i_create < i_wait < i_del == len(cmds) - 1

    # a set-up image: no build, no setup in the command; multi-slice
    cmds = commands(run("gke_xpk.sh", ["--dry-run", *XPK, "--docker_image=img:1", "--num_slices=2",
                                       "--steps=create"], env).stdout)
    create = cmds[-1]
    assert "--docker-image=img:1" in create and "--num-slices=2" in create
    assert not any(a.startswith(("--script-dir", "--base-docker-image")) for a in create)
    command = shlex.split(next(a for a in create if a.startswith("--command=")).split("=", 1)[1])
    assert command[:3] == ["python", "-m", "marval_jax.main"] and "--config.mesh.distributed_init=True" in command


def test_gke_xpk_existing_workload_and_bad_arguments(fake_gcloud):
    env, calls = fake_gcloud
    # the fake xpk answers no list -> created; FAKE_STATE makes every list print it, as xpk lists a running job
    wl = "--workload=w1"
    proc = run("gke_xpk.sh", [*XPK, "--docker_image=img:1", wl, "--steps=create"], dict(env, FAKE_STATE="w1 Running"))
    made = calls.read_text().splitlines()
    assert made[0].startswith("workload list --cluster=marval-v5p") and len(made) == 1, made
    assert "not created again" in proc.stdout
    for bad, msg in [(["--num_slices=0"], "--num_slices"), (["--workload=Bad_Name!"], "--workload"),
                     (["--workdir=/tmp/w"], "gs://"), (["--steps=create,logs"], "unknown step logs")]:
        proc = run("gke_xpk.sh", ["--dry-run", *XPK, *bad], env, check=False)
        assert proc.returncode == 2 and msg in proc.stderr, (bad, proc.stderr)
