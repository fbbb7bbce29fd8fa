"""Several modes of marval_jax.main in one process group: train, then evaluate, distill, rl, ... one after another.

launch/run_local.sh starts `$PYTHON -m marval_jax.main --mode=M --config=C --workdir=W <mesh args> <overrides>`;
with $PYTHON a wrapper that runs this file (launcher.pipeline_python), each process runs that command first and then
every further stage of $MARVAL_PIPELINE (a JSON list of [mode, config, workdir, [overrides]]), each through
`marval_jax.main.cli` with the same `--config.mesh.*` arguments: one `jax.distributed.initialize`, one import, the
process group kept between stages (a pod running its modes back to back). Prints `# stage i: MODE start` before
and `# stage i: MODE done, exit RC` after each; exits with the first non-zero stage status.

Stage mode `wait` (not a mode of main): wait until the file named as its config exists (written by another launch
running at the same time), at most $MARVAL_PIPELINE_WAIT_S seconds (default 600; exit 1 after that).
Stage mode `export` (not a mode of main): `marval_jax.tools.export_params.export` of the workdir (a run) into
`--out` in orbax format, the params checkpoint other stages or launches evaluate.

$MARVAL_WATCH_WRITES (folders joined by os.pathsep): every file this process opens for writing, and every folder it
makes, under one of them is printed as `# wrote PATH` (a Python audit hook: what the process itself writes through
Python, e.g. epath, numpy, PIL, json; tensorstore's C++ array writes are not seen), so a test can tell which process
wrote which file.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time


def _watch_writes(roots: tuple[str, ...]) -> None:
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & write_flags)
        elif event in ("os.mkdir", "os.rename", "os.replace"):
            path, writing = args[1] if event != "os.mkdir" else args[0], True
        else:
            return
        if not writing or not isinstance(path, (str, bytes, os.PathLike)):
            return
        path = os.path.abspath(os.fsdecode(path))
        if path.startswith(roots):
            sys.stdout.write(f"# wrote {path}\n")
            sys.stdout.flush()
    sys.addaudithook(hook)


def _export(config_spec: str, workdir: str, overrides: list[str]) -> int:
    from marval_jax.tools.export_params import export  # pylint: disable=import-outside-toplevel
    file, _, variant = config_spec.partition(":")
    config = importlib.import_module(file[:-len(".py")].replace("/", ".")).get_config(variant or None)
    out = next(a.split("=", 1)[1] for a in overrides if a.startswith("--out="))
    print(export(config, workdir, out, fmt="orbax"), flush=True)
    return 0


def _wait(path: str) -> int:
    deadline = time.monotonic() + float(os.environ.get("MARVAL_PIPELINE_WAIT_S", 600))
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            print(f"pipeline.py: {path} did not appear", flush=True)
            return 1
        time.sleep(0.5)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["-c"]:  # the launcher's own helper snippets (a free port)
        os.execv(sys.executable, [sys.executable, *argv])
    if argv[:2] != ["-m", "marval_jax.main"]:
        raise SystemExit(f"pipeline.py: expected '-m marval_jax.main ...', got {argv[:2]}")
    roots = tuple(os.path.abspath(r) for r in os.environ.get("MARVAL_WATCH_WRITES", "").split(os.pathsep) if r)
    if roots:
        _watch_writes(roots)
    args = argv[2:]
    first = [a for a in args if a.startswith(("--mode=", "--config=", "--workdir="))]
    mesh = [a for a in args if a.startswith("--config.mesh.")]
    overrides = [a for a in args if a not in first and a not in mesh]
    stages = [first + overrides] + [[f"--mode={m}", f"--config={c}", f"--workdir={w}", *o]
                                    for m, c, w, o in json.loads(os.environ.get("MARVAL_PIPELINE", "[]"))]
    from marval_jax.main import cli  # pylint: disable=import-outside-toplevel
    for i, stage in enumerate(stages):
        mode = stage[0].split("=", 1)[1]
        print(f"# stage {i}: {mode} start", flush=True)
        if mode == "wait":
            rc = _wait(stage[1].split("=", 1)[1])
        elif mode == "export":
            rc = _export(stage[1].split("=", 1)[1], stage[2].split("=", 1)[1], stage[3:])
        else:
            rc = cli(["marval_jax.main", *stage, *mesh])
        print(f"# stage {i}: {mode} done, exit {rc}", flush=True)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
