"""Entry point for every mode.

    python -m marval_jax.main --mode=train   --config=configs/mar.py:tiny --workdir=/tmp/mar_tiny
    python -m marval_jax.main --mode=sample  --config=configs/mar.py:tiny --workdir=/tmp/mar_tiny
    python -m marval_jax.main --mode=distill --config=configs/marval.py:tiny --workdir=/tmp/marval_tiny
    python -m marval_jax.main --mode=rl      --config=configs/marval_rl.py:tiny --workdir=/tmp/rl_tiny
    python -m marval_jax.main --mode=evaluate --config=configs/mar.py:tiny --workdir=/tmp/mar_tiny \
        --config.sample.fid_ref=raw:fashion_mnist/test --config.sample.crop=28
    python -m marval_jax.main --mode=demo --config=configs/demo.py --workdir=/tmp/marval_demo   # embedded default
    python -m marval_jax.main --mode=show_config --config=configs/mar.py:tiny    # variants, fields, defaults

Library log lines (orbax, absl, jax) below WARNING are hidden: a tiny run's log would be mostly orbax's INFO lines.
`--log_level=info` (or `--verbose`) shows them; this package's own lines are always shown.

Configs are locked: `--config.train.num_stpes=5` is an error naming the nearest valid fields. The whole config is
validated (`marval_jax.config_checks`) before anything is compiled or read. User errors (a bad flag, config field,
path, checkpoint) print one line `error: ...` and exit 2; `--verbose` adds the traceback. All logic lives in
importable modules; this file parses flags. `cli(argv)` runs the command line in-process and returns the exit code.
"""
from __future__ import annotations

import difflib
import logging
import os
import re
import sys

from absl import flags
from ml_collections import config_flags

from marval_jax.user_errors import UserError, call_cli, one_line, report, verbose_requested

MODES = ("train", "distill", "rl", "sample", "evaluate", "demo", "show_config")
LOG_LEVELS = ("debug", "info", "warning", "error")

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS, argv: list[str] | None = None) -> flags.FlagValues:
    """Defined on demand: importing this module from tests or other tools must not register flags. `argv` is the
    command line the config overrides (--config.a.b=v) are read from (None: sys.argv)."""
    config_flags.DEFINE_config_file("config", None, "A configs/*.py file with its variant: configs/mar.py:tiny.",
                                    flag_values=flag_values, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Run directory (local path or gs://...): checkpoints, metrics, samples.",
                        flag_values=flag_values)
    flags.DEFINE_enum("mode", "train", MODES, "What to run.", flag_values=flag_values)
    flags.DEFINE_string("out", "", "sample: output directory (default <workdir>/samples_final).",
                        flag_values=flag_values)
    flags.DEFINE_bool("verbose", False, "Print the traceback of user errors too, and library INFO log lines.",
                      flag_values=flag_values)
    flags.DEFINE_enum("log_level", "warning", LOG_LEVELS, "Lowest level of library (orbax, absl, jax) log lines "
                      "shown; this package's own lines are always shown.", flag_values=flag_values)
    return flag_values


TEST_VARIANTS = ("tiny", "test")


def tiny_note(config) -> str | None:
    """The log's note for a test-sized variant: its models train for seconds, so its sample grids are noise."""
    variant = str(config.get("variant", "")) if hasattr(config, "get") else ""
    if variant in TEST_VARIANTS:
        return (f"note: config variant {variant!r} is a test-sized model trained for seconds; its sample grids are "
                f"noise by design (configs/mar.py:fmnist or the demo show real images)")
    return None


def run(mode: str, config, workdir: str, out: str = ""):
    from marval_jax import config_checks
    from marval_jax.parallel import mesh as mesh_lib
    # the process group first, for every mode: validation asks JAX for device counts, which starts the backend, and
    # jax.distributed.initialize refuses to run after that
    mesh = config.get("mesh") if hasattr(config, "get") else None
    if mesh is not None:
        mesh_lib.maybe_initialize_distributed(mesh)
    config_checks.validate(mode, config, workdir, out)  # before any compile or data read
    note = tiny_note(config) if mode in ("train", "distill", "rl", "sample", "evaluate") else None
    if note:
        print(note, flush=True)
    if mode == "train":
        from marval_jax.train.loop import train
        from marval_jax.train.mar_task import make_mar_task
        return train(config, workdir, make_mar_task(config))
    if mode == "distill":
        from marval_jax.train.loop import train
        from marval_jax.train.distill_task import make_distill_task
        return train(config, workdir, make_distill_task(config))
    if mode == "rl":
        from marval_jax.train.loop import train
        from marval_jax.train.rl_task import make_rl_task
        return train(config, workdir, make_rl_task(config))
    if mode == "sample":
        from marval_jax.programs.sample import sample_from_workdir
        return sample_from_workdir(config, workdir, out)
    if mode == "evaluate":
        from marval_jax.programs.evaluate import evaluate
        return evaluate(config, workdir, out)
    if mode == "demo":
        from marval_jax.programs.demo import run_demo
        return run_demo(config, workdir)
    raise UserError(f"unknown mode {mode!r}; choose one of {MODES}")


# ---------------------------------------------------------------------------------------------------------------
# show_config: a config file's variants and fields
# ---------------------------------------------------------------------------------------------------------------
_COMMENTED = re.compile(r"^\s*(\w+)\s*=[^#]*#\s*(.+?)\s*$")


def _field_notes(paths: list[str]) -> dict[str, str]:
    """Leaf name -> its one-line comment in the config sources (`name=value,  # meaning`), names with one meaning."""
    seen: dict[str, set[str]] = {}
    for path in paths:
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            for line in f:
                m = _COMMENTED.match(line)
                if m:
                    seen.setdefault(m.group(1), set()).add(m.group(2))
    return {k: next(iter(v)) for k, v in seen.items() if len(v) == 1}


def _flatten(node, prefix: str = ""):
    for key in node.keys():
        value = node[key]
        path = f"{prefix}{key}"
        if hasattr(value, "keys"):
            yield from _flatten(value, path + ".")
        else:
            yield path, value


def show_config(spec: str, config) -> str:
    """The text of `--mode=show_config`: the file's variants, then every field (override name, value, meaning)."""
    import importlib.util  # pylint: disable=import-outside-toplevel
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_shown_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    variants = getattr(module, "VARIANTS", None)
    lines = [f"{path}: " + (f"variants {', '.join(variants)} (--config={path}:<variant>)" if variants
                            else "no variants"),
             f"fields of --config={spec} (override with --config.<field>=<value>):"]
    notes = _field_notes([path, os.path.join(os.path.dirname(path), "common.py")])
    for name, value in _flatten(config):
        note = notes.get(name.rsplit(".", 1)[-1])
        lines.append(f"  {name} = {value!r}" + (f"    # {note}" if note else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def _config_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    return exc


def _unknown_field(argv: list[str]) -> str | None:
    """'--config.a.b: no field b in a; nearest: a.c' for the first override naming a field the config lacks."""
    spec = _config_arg(argv)
    base_fv = flags.FlagValues()
    base_argv = [argv[0], f"--config={spec}"]
    config_flags.DEFINE_config_file("config", None, "", flag_values=base_fv, lock_config=True, sys_argv=base_argv)
    try:
        base_fv(base_argv)
        config = base_fv.config
    except Exception:  # noqa: BLE001 - the config itself does not load: reported by the caller
        return None
    for a in argv[1:]:
        if not a.startswith("--config."):
            continue
        path = a.split("=", 1)[0][len("--config."):]
        node, done = config, []
        for part in path.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                prefix = ".".join(done)
                nearest = difflib.get_close_matches(part, [str(k) for k in keys], n=3, cutoff=0.6)
                full = [f"{prefix}.{k}" if prefix else k for k in (nearest or keys)]
                hint = "nearest: " if nearest else f"valid fields of {prefix or 'the config'}: "
                if not keys:
                    return (f"unknown config field {path!r} (--config.{path}; {prefix} is a value, not a section) in "
                            f"{spec}")
                return f"unknown config field {path!r} (--config.{path}) in {spec}; {hint}{', '.join(full[:12])}"
            node = node[part]
            done.append(part)
    return None


def _flag_error_line(exc: BaseException, argv: list[str]) -> str | None:
    """One line for a command-line error (bad flag, config file, variant, override), or None for a bug (a config
    file that raises TypeError, NameError, ... keeps its traceback)."""
    spec = _config_arg(argv)
    cause = _root_cause(exc)
    if isinstance(exc, (KeyError, AttributeError)) or isinstance(cause, KeyError):
        line = _unknown_field(argv)   # a typo'd override: the field and its nearest valid names
        if line is not None:
            return line
    if spec and isinstance(cause, OSError) and not os.path.isfile(spec.split(":", 1)[0]):
        return (f"config file {spec.split(':', 1)[0]} not found (--config={spec}); give a configs/*.py file with "
                f"its variant, e.g. --config=configs/mar.py:tiny")
    user_cause = isinstance(cause, (ValueError, KeyError, OSError, ImportError))
    if isinstance(exc, flags.IllegalFlagValueError) and str(exc).startswith("flag --config="):
        # the config file's get_config raised: its message (e.g. an unknown variant), not the quoted traceback
        return f"--config={spec}: {one_line(cause)}" if user_cause else None
    if isinstance(exc, flags.Error):
        return one_line(exc)
    return f"--config={spec}: {one_line(cause)}" if user_cause else None


def _main(fv: flags.FlagValues, rest: list[str], argv: list[str]):
    if len(rest) > 1:
        raise UserError(f"unexpected arguments: {rest[1:]} (flags are --name=value)")
    if fv.mode == "show_config":
        if fv.config is None:
            raise UserError("--mode=show_config needs --config, e.g. --config=configs/mar.py:tiny")
        print(show_config(_config_arg(argv), fv.config), flush=True)
        return 0
    if fv.config is None or fv.workdir is None:
        raise UserError("--config and --workdir are required, e.g. --config=configs/mar.py:tiny --workdir=/tmp/run")
    return run(fv.mode, fv.config, fv.workdir, fv.out)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class LibraryLogFilter(logging.Filter):
    """Drops library log records (orbax, absl, jax: any source file outside this package) below `level`."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or record.pathname.startswith(_PACKAGE_DIR)


def configure_logging(library_level: str = "warning") -> None:
    """absl's handler at INFO for this package's lines; library lines below `library_level` dropped."""
    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
    absl_logging.use_absl_handler()
    absl_logging.set_verbosity(absl_logging.DEBUG if library_level == "debug" else absl_logging.INFO)
    handler = absl_logging.get_absl_handler()
    for f in [f for f in handler.filters if isinstance(f, LibraryLogFilter)]:
        handler.removeFilter(f)
    handler.addFilter(LibraryLogFilter(getattr(logging, library_level.upper())))


def cli(argv: list[str] | None = None) -> int:
    """The command line `argv` (argv[0] the program), in-process; returns the exit code (2: user error)."""
    argv = list(sys.argv if argv is None else argv)
    fv = define_flags(flags.FlagValues(), argv)
    if any(a in ("--help", "-h", "--helpfull", "--helpshort") for a in argv[1:]):
        print(__doc__ + "\n" + fv.get_help(), flush=True)
        return 0
    try:
        rest = fv(argv)
        if fv.config is not None:
            fv.config.keys()  # a config file that failed to load raises only when first used
    except Exception as exc:  # noqa: BLE001 - sorted into a one-line user error or a bug below
        line = _flag_error_line(exc, argv)
        if line is None or verbose_requested(argv):
            raise
        return report(UserError(line))
    if not FLAGS.is_parsed():  # libraries that read absl flags (grain's workers) see the defaults
        FLAGS.mark_as_parsed()
    configure_logging("info" if fv.verbose else fv.log_level)
    result = call_cli(lambda: _main(fv, rest, argv), argv)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def main() -> None:
    sys.exit(cli(sys.argv))


if __name__ == "__main__":
    main()
