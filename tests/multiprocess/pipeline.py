"""Several modes of marval_jax.main in one process group: train, then evaluate, distill, rl, ... one after another.

launch/run_local.sh starts `$PYTHON -m marval_jax.main --mode=M --config=C --workdir=W <mesh args> <overrides>`;
with $PYTHON a wrapper that runs this file (launcher.pipeline_python), each process runs that command first and then
every further stage of $MARVAL_PIPELINE (a JSON list of [mode, config, workdir, [overrides]]), each through
`marval_jax.main.cli` with the same `--config.mesh.*` arguments: one `jax.distributed.initialize`, one import, the
process group kept between stages (a pod running its modes back to back). Prints `# stage i: MODE done` after each;
exits with the first non-zero stage status."""
from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    if argv[:1] == ["-c"]:  # the launcher's own helper snippets (a free port)
        os.execv(sys.executable, [sys.executable, *argv])
    if argv[:2] != ["-m", "marval_jax.main"]:
        raise SystemExit(f"pipeline.py: expected '-m marval_jax.main ...', got {argv[:2]}")
    args = argv[2:]
    first = [a for a in args if a.startswith(("--mode=", "--config=", "--workdir="))]
    mesh = [a for a in args if a.startswith("--config.mesh.")]
    overrides = [a for a in args if a not in first and a not in mesh]
    stages = [first + overrides] + [[f"--mode={m}", f"--config={c}", f"--workdir={w}", *o]
                                    for m, c, w, o in json.loads(os.environ.get("MARVAL_PIPELINE", "[]"))]
    from marval_jax.main import cli  # pylint: disable=import-outside-toplevel
    for i, stage in enumerate(stages):
        rc = cli(["marval_jax.main", *stage, *mesh])
        mode = stage[0].split("=", 1)[1]
        print(f"# stage {i}: {mode} done, exit {rc}", flush=True)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
