"""GCP Batch job specs: every variant launch/batch_spec.py renders is a valid batch_v1.Job (parsed by the API's own
message types, unknown fields refused), and the multi-node script gives each task the right jax.distributed flags.
"""
import importlib.util
import json
import os
import pathlib
import shlex
import subprocess

import pytest
from google.cloud import batch_v1
from google.protobuf import json_format

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("batch_spec", ROOT / "launch" / "batch_spec.py")
batch_spec = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(batch_spec)
BASE = ["--code=gs://bucket/code/marval_jax-abc.tar.gz", "--mode=distill", "--config=configs/marval.py:base",
        "--workdir=gs://bucket/marval_base", "--zone=us-central1-a"]


def strict_job(doc) -> batch_v1.Job:
    """Parse as the Batch API's Job message; an unknown or mistyped field raises ParseError."""
    job = batch_v1.Job()
    json_format.Parse(json.dumps(doc), job._pb, ignore_unknown_fields=False)
    return job


@pytest.mark.parametrize("extra", [
    [],
    ["--provisioning=SPOT", "--machine_type=a3-highgpu-8g"],
    ["--nodes=4", "--reservation=projects/p/reservations/h200-pool"],
    ["--nodes=2", "--image=us-docker.pkg.dev/p/r/marval:1"],
    ["--image=us-docker.pkg.dev/p/r/marval:1", "--machine_type=g2-standard-8"],
])
def test_every_variant_is_a_valid_batch_job(extra):
    doc = batch_spec.render(batch_spec.parse([*BASE, *extra, "--", "--config.teacher_ckpt=gs://b/t"]))
    job = strict_job(doc)
    group = job.task_groups[0]
    nodes = int(next((a.split("=")[1] for a in extra if a.startswith("--nodes=")), 1))
    assert group.task_count == nodes and group.parallelism == nodes and group.task_count_per_node == 1
    assert group.require_hosts_file == (nodes > 1)
    policy = job.allocation_policy.instances[0].policy
    spot = "--provisioning=SPOT" in extra
    assert policy.provisioning_model == (batch_v1.AllocationPolicy.ProvisioningModel.SPOT if spot else
                                         batch_v1.AllocationPolicy.ProvisioningModel.STANDARD)
    assert policy.reservation == ("projects/p/reservations/h200-pool" if "--reservation" in " ".join(extra) else "")


def test_strict_parse_refuses_an_unknown_field():
    doc = batch_spec.render(batch_spec.parse(BASE))
    doc["taskGroups"][0]["tasksPerNode"] = 1   # not a TaskGroup field (taskCountPerNode is)
    with pytest.raises(json_format.ParseError, match="tasksPerNode"):
        strict_job(doc)
    doc = batch_spec.render(batch_spec.parse(BASE))
    doc["allocationPolicy"]["instances"][0]["policy"]["provisioningModel"] = "ON_DEMAND"   # not an enum value
    with pytest.raises(json_format.ParseError):
        strict_job(doc)


def test_bad_capacity_options_are_errors():
    with pytest.raises(SystemExit, match="STANDARD"):
        batch_spec.render(batch_spec.parse([*BASE, "--provisioning=SPOT", "--reservation=r"]))
    with pytest.raises(SystemExit, match="--nodes"):
        batch_spec.render(batch_spec.parse([*BASE, "--nodes=0"]))


def flags_of_task(script, env):
    """Run the script's last two lines (main-node lookup + command) in bash with the task's Batch environment, the
    python replaced by a printer: the argv the program would get on that task."""
    lines = script.splitlines()[-2:]
    assert lines[0].startswith("MAIN=")
    cmd = lines[1].replace("/opt/marval_venv/bin/python", "printf '%s\\n'", 1)
    out = subprocess.run(["bash", "-c", "set -euo pipefail\n" + lines[0] + "\n" + cmd], env=env, text=True,
                         capture_output=True, check=True).stdout
    return out.splitlines()


def test_multi_node_script_gives_each_task_its_process(tmp_path):
    doc = batch_spec.render(batch_spec.parse([*BASE, "--nodes=3", "--port=9999"]))
    script = doc["taskGroups"][0]["taskSpec"]["runnables"][0]["script"]["text"]
    hosts = tmp_path / "hosts"
    hosts.write_text("marval-job-group0-0 10.0.0.2\nmarval-job-group0-1 10.0.0.3\nmarval-job-group0-2 10.0.0.4\n")
    base = {"PATH": os.environ["PATH"], "BATCH_HOSTS_FILE": str(hosts), "BATCH_TASK_COUNT": "3"}
    argv = flags_of_task(script, dict(base, BATCH_TASK_INDEX="2"))
    assert argv[:2] == ["-m", "marval_jax.main"]
    assert argv[-4:] == ["--config.mesh.distributed_init=True",
                         "--config.mesh.coordinator_address=marval-job-group0-0:9999",
                         "--config.mesh.num_processes=3", "--config.mesh.process_id=2"]
    # Batch's own main-node variable wins over the hosts file
    argv = flags_of_task(script, dict(base, BATCH_TASK_INDEX="0", BATCH_MAIN_NODE_HOSTNAME="main-vm"))
    assert "--config.mesh.coordinator_address=main-vm:9999" in argv and "--config.mesh.process_id=0" in argv
    # one node: no distributed flags, no main-node lookup
    single = batch_spec.render(batch_spec.parse(BASE))["taskGroups"][0]["taskSpec"]["runnables"][0]["script"]["text"]
    assert "mesh" not in single and "MAIN=" not in single


def test_multi_node_container_expands_the_task_environment():
    doc = batch_spec.render(batch_spec.parse([*BASE, "--nodes=2", "--image=img:1"]))
    container = doc["taskGroups"][0]["taskSpec"]["runnables"][0]["container"]
    assert container["entrypoint"] == "bash" and container["commands"][0] == "-c"
    text = container["commands"][1]
    last = shlex.split(text.splitlines()[-1])
    assert last[:4] == ["exec", "python", "-m", "marval_jax.main"]
    assert '--config.mesh.process_id="$BATCH_TASK_INDEX"' in text


def test_gcp_batch_sh_multi_node_dry_run_spec_is_valid(tmp_path):
    """The spec gcp_batch.sh would submit (printed by its dry run) parses as a Job; a bad option fails before any
    upload."""
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "gcloud").write_text("#!/bin/sh\nexit 99\n")   # any real call would fail the run
    (tmp_path / "gcloud").chmod(0o755)
    args = ["bash", "launch/gcp_batch.sh", "--dry-run", "--project=my-proj", "--region=us-central1",
            "--zone=us-central1-a", "--code_bucket=gs://bucket/code", "--mode=distill",
            "--config=configs/marval.py:base", "--workdir=gs://bucket/marval_base", "--nodes=2",
            "--reservation=h200-pool", "--port=8476"]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    start = next(i for i, l in enumerate(lines) if l == "# {")
    end = lines.index("# }", start)
    job = strict_job(json.loads("\n".join(l[2:] for l in lines[start:end + 1])))
    assert job.task_groups[0].task_count == 2 and job.task_groups[0].require_hosts_file
    assert job.allocation_policy.instances[0].policy.reservation == "h200-pool"
    proc = subprocess.run([*args, "--spot"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--reservation takes STANDARD" in proc.stderr
    assert "+ " not in proc.stdout, "nothing is printed as run before the options are checked"
