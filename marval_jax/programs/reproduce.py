"""The Fashion-MNIST reproduction, stage by stage: teacher (MAR) -> student (GSIM) -> RL student (MARVAL-RL).

    python -m marval_jax.programs.reproduce --workdir=workdirs/fmnist                     # all stages, config steps
    python -m marval_jax.programs.reproduce --workdir=workdirs/fmnist_small --recipe=small  # the 2.16M models
    python -m marval_jax.programs.reproduce --workdir=W --stages=teacher --budget=teacher=240 --export=EXPORT_DIR
    python -m marval_jax.programs.reproduce --workdir=W --stages=student,rl --teacher=EXPORT_DIR/fmnist_teacher \
        --budget=student=300,rl=180 --export=EXPORT_DIR

Each stage is `python -m marval_jax.main` in its own process on `<workdir>/<stage>` (so it resumes from its latest
checkpoint when rerun) and is then exported as a params directory `<export>/fmnist_<stage>` (model.json +
params.npz, float16: the embedded-default format, marval_jax/assets/). A stage with a time budget is sent SIGTERM
when the budget is spent: the training loop saves and exits cleanly, so the exported weights are those of the last
completed step, and `<export>/stages.json` records the steps and seconds each stage took. Later stages read the
previous stage's export (or `--teacher` / `--student` directories), so stages can run in separate runs.
`--recipe` picks the models: `shipped` (default) trains what marval_jax/assets/ holds.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from marval_jax.user_errors import UserError, add_verbose_flag, run_cli

STAGES = {  # stage -> (mode, config file, flag naming the previous stage's weights, previous stage)
    "teacher": ("train", "configs/mar.py", None, None),
    "student": ("distill", "configs/marval.py", "teacher_ckpt", "teacher"),
    "rl": ("rl", "configs/marval_rl.py", "student_ckpt", "student"),
}
# recipe -> (config variant of every stage, overrides per stage). "shipped" is how the embedded default
# (marval_jax/assets/, docs/results.md) was trained: the fmnist_l models, the student with the GSIM ablation's best
# weighting (docs/results.md "GSIM ablation"), the RL student held near the student by the l2 regulariser (without
# one it lost the student's recall, docs/results.md); "small" is the 2.16M-parameter set shipped until 2026-12-06.
RECIPES = {
    "shipped": ("fmnist_l", {"student": ("gsim.weighting=kl",), "rl": ("rl.regularizer=l2", "rl.reg_weight=10")}),
    "small": ("fmnist", {}),
}
GRACE_S = 120  # after SIGTERM: time to finish the step, write the checkpoint and exit


def parse_budget(text: str) -> dict[str, float]:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, seconds = item.partition("=")
        if name not in STAGES or not seconds:
            raise UserError(f"--budget items look like teacher=240 with a stage in {list(STAGES)}, got {item!r}")
        out[name] = float(seconds)
    return out


def run_stage(cmd: list[str], budget_s: float | None, log_path: str) -> tuple[int, float, bool]:
    """Runs `cmd`; after `budget_s` sends SIGTERM (the loop checkpoints and exits 0). Returns (rc, seconds, cut)."""
    t0 = time.time()
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        cut = False
        os.set_blocking(proc.stdout.fileno(), False)
        while proc.poll() is None:
            line = proc.stdout.readline()
            if line:
                log.write(line)
                if not line.startswith(("I1", "W1", "WARNING")):
                    sys.stdout.write(line)
                    sys.stdout.flush()
                continue
            if budget_s is not None and not cut and time.time() - t0 > budget_s:
                proc.send_signal(signal.SIGTERM)
                cut = True
            if cut and time.time() - t0 > budget_s + GRACE_S:
                proc.kill()
            time.sleep(0.2)
        rest = proc.stdout.read()
        if rest:
            log.write(rest)
            sys.stdout.write(rest)
    return proc.returncode, time.time() - t0, cut


def last_step(workdir: str) -> int | None:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        lines = [l for l in f if l.strip()]
    return json.loads(lines[-1])["step"] if lines else None


def stage_configs(a) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(config of each stage, its --config.key=value overrides) from --recipe, --config and --set. The recipe's
    overrides go with the recipe's configs (a stage given another --config gets none); --set comes after them."""
    variant, recipe_sets = RECIPES[a.recipe]
    recipe = {stage: f"{config_file}:{variant}" for stage, (_, config_file, _, _) in STAGES.items()}
    configs = dict(recipe)
    for item in a.config:
        stage, _, spec = item.partition("=")
        if stage not in STAGES or spec.split(":")[0] != STAGES[stage][1]:
            raise UserError(f"--config wants STAGE={{config of that stage's file}}, e.g. "
                            f"teacher={STAGES['teacher'][1]}:fmnist, got {item!r}")
        configs[stage] = spec
    overrides = {stage: [f"--config.{kv}" for kv in recipe_sets.get(stage, ())] if configs[stage] == recipe[stage]
                 else [] for stage in STAGES}
    for item in a.set:
        stage, _, kv = item.partition(":")
        if stage not in STAGES or "=" not in kv:
            raise UserError(f"--set wants STAGE:KEY=VALUE with a stage in {list(STAGES)}, got {item!r}")
        overrides[stage].append(f"--config.{kv}")
    return configs, overrides


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m marval_jax.programs.reproduce", description=__doc__.split("\n")[0])
    add_verbose_flag(p)
    p.add_argument("--workdir", required=True, help="run directories <workdir>/<stage>")
    p.add_argument("--stages", default="teacher,student,rl")
    p.add_argument("--budget", default="", help="seconds per stage, e.g. teacher=240,student=300 (SIGTERM after)")
    p.add_argument("--export", default="", help="params directories fmnist_<stage> go here (default <workdir>/export)")
    p.add_argument("--teacher", default="", help="teacher weights for the student stage (default: its export)")
    p.add_argument("--student", default="", help="student weights for the rl stage (default: its export)")
    p.add_argument("--dtype", default="float16", help="stored dtype of the exported weights")
    p.add_argument("--recipe", default="shipped", choices=sorted(RECIPES),
                   help="shipped: the fmnist_l models of the embedded default (student with gsim.weighting=kl, "
                        "RL student with rl.regularizer=l2 rl.reg_weight=10); "
                        "small: the 2.16M fmnist models")
    p.add_argument("--config", action="append", default=[], metavar="STAGE=CONFIG",
                   help="another config of a stage's family, e.g. teacher=configs/mar.py:fmnist (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE:KEY=VALUE",
                   help="config override of one stage, e.g. rl:train.num_steps=100 (repeatable)")
    a = p.parse_args(argv)
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise UserError(f"unknown stage(s) {bad}; choose from {list(STAGES)}")
    budgets = parse_budget(a.budget)
    configs, overrides = stage_configs(a)
    export = a.export or os.path.join(a.workdir, "export")
    os.makedirs(export, exist_ok=True)
    os.makedirs(a.workdir, exist_ok=True)
    given = {"teacher": a.teacher, "student": a.student}
    record_path = os.path.join(export, "stages.json")
    record = json.load(open(record_path)) if os.path.exists(record_path) else {}
    for stage in stages:
        mode, _, weights_flag, prev = STAGES[stage]
        config = configs[stage]
        workdir = os.path.join(a.workdir, stage)
        cmd = [sys.executable, "-m", "marval_jax.main", f"--mode={mode}", f"--config={config}",
               f"--workdir={workdir}", *overrides[stage]]
        if weights_flag:
            source = given.get(prev) or os.path.join(export, f"fmnist_{prev}")
            if not os.path.exists(source):
                raise UserError(f"stage {stage} needs the {prev} weights: {source} does not exist "
                                 f"(run --stages={prev} first or pass --{prev}=DIR)")
            cmd.append(f"--config.{weights_flag}={source}")
        print(f"== {stage}: {' '.join(cmd[1:])}", flush=True)
        rc, seconds, cut = run_stage(cmd, budgets.get(stage), os.path.join(a.workdir, f"{stage}.log"))
        if rc != 0:
            print(f"== {stage} failed with exit code {rc} after {seconds:.0f} s (log {a.workdir}/{stage}.log)")
            return rc
        # exported in a child process on the CPU: JAX in this process would hold accelerator memory that the next
        # stage then cannot preallocate (seen on the H200: the RL stage fell back from a 104 GiB pool)
        out = os.path.join(export, f"fmnist_{stage}")
        rc = subprocess.call([sys.executable, "-m", "marval_jax.tools.export_params", f"--config={config}",
                              f"--source={workdir}", f"--out={out}", f"--dtype={a.dtype}"],
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if rc != 0:
            print(f"== {stage}: exporting {workdir} failed with exit code {rc}")
            return rc
        entry = record.get(stage, {"seconds": 0.0})
        entry.update(seconds=entry["seconds"] + seconds, steps=last_step(workdir), stopped_by_budget=cut,
                     command=" ".join(["python"] + cmd[1:]), export=out)
        record[stage] = entry
        with open(record_path, "w") as f:
            json.dump(record, f, indent=1)
        print(f"== {stage}: {entry['steps']} steps, {seconds:.0f} s{' (budget)' if cut else ''} -> {out}",
              flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
