"""The README's first-hour commands, as a newcomer types them: in an order where each step finds what it needs.

Each `python -m marval_jax.main` line is parsed by the real flag parser (its mode exists, its config file and
variant load, every `--config.a.b=` override names a field) and validated by `config_checks.validate` (what a run
checks before it compiles or reads anything), with the README's /tmp workdirs replaced: a workdir the README's
earlier steps trained becomes the session's tiny trained workdir (tests/conftest.py), a fresh one a temporary path.
`--help` and `--mode=show_config` run in-process. The other commands name modules that exist and flags those
modules define. The order is checked too: distill's teacher_ckpt is an earlier train's workdir, rl's student_ckpt an
earlier distill's, sample and evaluate read a trained workdir, and evaluate comes after convert_inception.
Training itself is not run here (the tiny runs have their own tests)."""
import importlib.util
import os
import re
import shlex

import pytest
from absl import flags

from marval_jax.main import MODES, cli, define_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Your first hour on a fresh clone"


def first_hour_commands() -> list[list[str]]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert SECTION in text, f"README.md lost its section {SECTION!r}"
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return [shlex.split(line.strip()) for line in body.splitlines() if line.startswith("    ") and line.strip()]


def main_table_commands() -> list[list[str]]:
    """The `python -m marval_jax.main` commands of the README's table of common commands."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return [shlex.split(c) for c in re.findall(r"`(python -m marval_jax\.main [^`]*)`", text)]


def parse_main(argv: list[str]) -> flags.FlagValues:
    fv = define_flags(flags.FlagValues(), argv)
    fv(argv)
    fv.config.keys()  # a config file that failed to load raises here
    return fv


def test_every_first_hour_command_names_what_exists_in_a_runnable_order(tiny_teacher, tmp_path):
    from marval_jax import config_checks
    commands = first_hour_commands()
    assert commands[0] == ["bash", "launch/setup_env.sh", "--test"]
    assert '"${1:-}" = "--test"' in open(os.path.join(ROOT, "launch", "setup_env.sh")).read()
    trained = {"train": [], "distill": [], "rl": []}
    seen_modules, checked_modes = [], []
    for cmd in commands[1:]:
        assert cmd[:2] == ["python", "-m"], cmd
        module, args = cmd[2], cmd[3:]
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
        seen_modules.append(module)
        if module != "marval_jax.main":
            source = open(importlib.util.find_spec(module).origin).read()
            for a in args:
                assert f'"{a.split("=", 1)[0]}"' in source, f"{module} defines no flag {a}"
            continue
        argv = ["marval_jax.main", *args]
        if args in (["--help"], ["-h"]):
            assert cli(argv) == 0
            continue
        fv = parse_main(argv)
        assert fv.mode in MODES
        if fv.mode == "show_config":
            assert cli(argv) == 0
            checked_modes.append(fv.mode)
            continue
        family = {"train": "mar.py", "sample": "mar.py", "evaluate": "mar.py", "distill": "marval.py",
                  "rl": "marval_rl.py"}[fv.mode]
        assert args[1].startswith(f"--config=configs/{family}:"), cmd
        # where each step's inputs come from: an earlier step of this list
        if fv.mode == "distill":
            assert fv.config.teacher_ckpt in trained["train"], cmd
        if fv.mode == "rl":
            assert fv.config.student_ckpt in trained["distill"], cmd
        if fv.mode in ("sample", "evaluate"):
            assert fv.workdir in trained["train"], cmd
        if fv.mode == "evaluate":
            assert "marval_jax.tools.convert_inception" in seen_modules, "evaluate before convert_inception"
        # what the run checks before compiling anything, with every trained workdir the session's tiny one
        stand_in = {w: tiny_teacher for ws in trained.values() for w in ws}
        parsed = parse_main(["marval_jax.main", *[_replace(a, stand_in) for a in args]])
        workdir = stand_in.get(fv.workdir, str(tmp_path / fv.mode))
        if fv.mode != "evaluate":   # evaluate's files (Inception weights) are checked by its own tests
            config_checks.validate(fv.mode, parsed.config, workdir)
        if fv.mode in trained:
            trained[fv.mode].append(fv.workdir)
        checked_modes.append(fv.mode)
    assert checked_modes == ["show_config", "train", "sample", "distill", "rl", "evaluate"]


def _replace(arg: str, paths: dict[str, str]) -> str:
    name, eq, value = arg.partition("=")
    return f"{name}={paths[value]}" if eq and value in paths and name != "--workdir" else arg


@pytest.mark.parametrize("cmd", main_table_commands(), ids=lambda c: " ".join(c[3:5]))
def test_every_main_command_of_the_readme_parses(cmd):
    """Modes, config files, variants and override fields of every `python -m marval_jax.main` in the README."""
    fv = parse_main(["marval_jax.main", *cmd[3:]])
    assert fv.mode in MODES
    if fv.mode == "distill":
        assert fv.config.teacher_ckpt, f"{cmd}: distill needs --config.teacher_ckpt"
    if fv.mode == "rl":
        assert fv.config.student_ckpt, f"{cmd}: rl needs --config.student_ckpt"
