"""launch/fetch_device_wheels.sh takes the versions of the libraries every machine pins from launch/constraints.txt,
so the GPU host runs the same grain / clu / tensorflow-datasets as CI (a bumped pin moves the device's wheel with it)."""
from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_dry_run_lists_the_constraints_pins_and_each_package_once():
    proc = subprocess.run(["bash", "launch/fetch_device_wheels.sh", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    reqs = proc.stdout.split()
    pins = dict(line.strip().split("==") for line in open(os.path.join(ROOT, "launch", "constraints.txt"))
                if "==" in line and not line.startswith("#"))
    for name in ("grain", "ml-collections", "clu", "tensorflow-datasets", "array-record"):
        assert f"{name}=={pins[name]}" in reqs
    names = [r.split("==")[0].lower().replace("_", "-") for r in reqs]
    assert len(names) == len(set(names)), names   # two versions of one package stop the device's install
    assert all("==" in r for r in reqs)
