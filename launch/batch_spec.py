"""Render launch/gcp_batch_job.json (a `gcloud batch jobs submit --config` job spec) for one marval_jax.main run.

    python3 launch/batch_spec.py --code gs://BUCKET/code/marval_jax-SHA.tar.gz --mode distill \
        --config configs/marval.py:base --workdir gs://BUCKET/marval_base --zone us-central1-a > job.json

The task unpacks the code tarball from the mounted bucket, runs launch/worker_setup.sh cuda (venv on uv's managed
Python + pinned jax[cuda12] + launch/setup_env.sh) and then `python -m marval_jax.main` on all GPUs of the VM. With
--image the runnable is that container instead (the image must hold the set-up repository as its working
directory); Batch exposes the GPUs to it when installGpuDrivers is true.

--nodes N > 1: one task per VM (taskCount = parallelism = N, taskCountPerNode 1) and requireHostsFile, so Batch
starts all N together and tells each task the hosts. Each task runs one process of a jax.distributed job:
`--config.mesh.distributed_init=True --config.mesh.coordinator_address=MAIN:PORT --config.mesh.num_processes=N
--config.mesh.process_id=$BATCH_TASK_INDEX`, MAIN being $BATCH_MAIN_NODE_HOSTNAME (the VM of task 0), else the first
line of $BATCH_HOSTS_FILE. The processes talk over the VPC (the default network's default-allow-internal rule
lets them; a custom network needs a rule for PORT and the collectives between the VMs). No SSH between the VMs
is needed (permissiveSsh stays off). A failed task is retried (--max_retries); the other processes then lose their
peer and fail too, and their retries all resume from the workdir's latest checkpoint.

Capacity: --provisioning STANDARD (on-demand) or SPOT; --reservation NAME (or projects/P/reservations/NAME) takes
the VMs from that reservation (STANDARD only; the reservation must be of --machine_type in --zone).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# machine type -> (accelerator type, count) for GPU VMs whose GPUs come with the machine type
GPU_MACHINES = {
    "a3-ultragpu-8g": ("nvidia-h200-141gb", 8),
    "a3-megagpu-8g": ("nvidia-h100-mega-80gb", 8),
    "a3-highgpu-8g": ("nvidia-h100-80gb", 8),
    "a2-ultragpu-1g": ("nvidia-a100-80gb", 1),
    "a2-ultragpu-8g": ("nvidia-a100-80gb", 8),
    "a2-highgpu-1g": ("nvidia-tesla-a100", 1),
    "g2-standard-8": ("nvidia-l4", 1),
}


def main_command(args) -> list[str]:
    return ["-m", "marval_jax.main", f"--mode={args.mode}", f"--config={args.config}",
            f"--workdir={args.workdir}", *args.extra]


def distributed_flags(args) -> str:
    """The multi-node flags as shell text: the coordinator and process id come from the task's environment."""
    if args.nodes == 1:
        return ""
    return (' --config.mesh.distributed_init=True --config.mesh.coordinator_address="$MAIN":%d'
            ' --config.mesh.num_processes=%d --config.mesh.process_id="$BATCH_TASK_INDEX"' % (args.port, args.nodes))


MAIN_NODE = 'MAIN=${BATCH_MAIN_NODE_HOSTNAME:-$(head -n1 "$BATCH_HOSTS_FILE" | cut -d" " -f1)}'


def script_text(args) -> str:
    bucket_dir, tar = args.code[len("gs://"):].rsplit("/", 1)
    py = "/opt/marval_venv/bin/python"
    return "\n".join([
        "set -euxo pipefail",
        "rm -rf /opt/marval_jax && mkdir -p /opt/marval_jax",
        f"tar xzf /mnt/marval_code/{tar} -C /opt/marval_jax --strip-components=1",
        "cd /opt/marval_jax",
        "MARVAL_VENV=/opt/marval_venv bash launch/worker_setup.sh cuda",
        *([MAIN_NODE] if args.nodes > 1 else []),
        f"JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_MEM_FRACTION={args.mem_fraction} "
        + shlex.join([py, *main_command(args)]) + distributed_flags(args),
    ])


def fill(node, values):
    if isinstance(node, dict):
        return {k: fill(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [fill(v, values) for v in node]
    if isinstance(node, str) and node.startswith("@") and node.endswith("@") and node[1:-1] in values:
        return values[node[1:-1]]
    if isinstance(node, str):
        for k, v in values.items():
            node = node.replace(f"@{k}@", str(v))
    return node


def render(args) -> dict:
    if not args.code.startswith("gs://") or not args.code.endswith(".tar.gz"):
        raise SystemExit(f"--code must be gs://BUCKET/.../NAME.tar.gz, got {args.code!r}")
    if args.nodes < 1:
        raise SystemExit(f"--nodes must be at least 1, got {args.nodes}")
    if args.reservation and args.provisioning != "STANDARD":
        raise SystemExit(f"--reservation takes STANDARD VMs; drop --provisioning={args.provisioning} "
                         "(or the reservation)")
    gpu_type, gpu_count = GPU_MACHINES.get(args.machine_type, (args.gpu_type, args.gpu_count))
    gpu_type, gpu_count = args.gpu_type or gpu_type, args.gpu_count or gpu_count
    if not gpu_type or not gpu_count:
        raise SystemExit(f"--gpu_type and --gpu_count are needed for machine type {args.machine_type!r}")
    with open(os.path.join(HERE, "gcp_batch_job.json")) as f:
        spec = json.load(f)
    values = dict(SCRIPT=script_text(args), CODE_BUCKET_PATH=args.code[len("gs://"):].rsplit("/", 1)[0],
                  CPU_MILLI=args.cpu_milli, MEMORY_MIB=args.memory_mib, MAX_RETRIES=args.max_retries,
                  MAX_RUN_DURATION=args.max_run_duration, MACHINE_TYPE=args.machine_type, GPU_TYPE=gpu_type,
                  GPU_COUNT=int(gpu_count), PROVISIONING=args.provisioning, DISK_GB=args.disk_gb, ZONE=args.zone,
                  RUN=args.run, NODES=args.nodes, MULTI_NODE=args.nodes > 1)
    spec = fill(spec, values)
    if args.reservation:
        spec["allocationPolicy"]["instances"][0]["policy"]["reservation"] = args.reservation
    if args.image:
        container = {"imageUri": args.image, "entrypoint": "python", "commands": main_command(args),
                     "volumes": ["/mnt/marval_code:/mnt/marval_code"]}
        if args.nodes > 1:  # the flags need the task's environment: a shell expands them
            container.update(entrypoint="bash", commands=["-c", MAIN_NODE + "\nexec "
                                                          + shlex.join(["python", *main_command(args)])
                                                          + distributed_flags(args)])
        spec["taskGroups"][0]["taskSpec"]["runnables"] = [{"container": container}]
        spec["taskGroups"][0]["taskSpec"]["environment"] = {"variables": {
            "JAX_PLATFORMS": "cuda", "XLA_PYTHON_CLIENT_MEM_FRACTION": str(args.mem_fraction)}}
    return spec


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--code", required=True, help="gs://.../marval_jax-SHA.tar.gz (git archive of the code)")
    p.add_argument("--mode", required=True, choices=("train", "distill", "rl", "sample"))
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--zone", required=True)
    p.add_argument("--run", default="marval")
    p.add_argument("--machine_type", default="a3-ultragpu-8g")
    p.add_argument("--gpu_type", default="")
    p.add_argument("--gpu_count", type=int, default=0)
    p.add_argument("--provisioning", default="STANDARD", choices=("STANDARD", "SPOT"))
    p.add_argument("--reservation", default="", help="reservation name or projects/P/reservations/NAME")
    p.add_argument("--nodes", type=int, default=1, help="VMs, one process each (jax.distributed when > 1)")
    p.add_argument("--port", type=int, default=8476, help="the coordinator's port on the main node")
    p.add_argument("--cpu_milli", type=int, default=8000)
    p.add_argument("--memory_mib", type=int, default=65536)
    p.add_argument("--disk_gb", type=int, default=200)
    p.add_argument("--max_retries", type=int, default=2, help="retries resume from the workdir's checkpoint")
    p.add_argument("--max_run_duration", default="604800s")
    p.add_argument("--mem_fraction", type=float, default=0.9)
    p.add_argument("--image", default="", help="container image holding the set-up repository (optional)")
    p.add_argument("extra", nargs="*", help="extra flags for marval_jax.main (after --)")
    return p.parse_args(argv)


if __name__ == "__main__":
    json.dump(render(parse()), sys.stdout, indent=2)
    sys.stdout.write("\n")
