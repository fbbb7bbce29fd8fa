"""User errors: what a person can fix (a config field, a path, a checkpoint, a held lock) as opposed to a bug.

Every program entry point (`marval_jax.main`, `python -m marval_jax.tools.X`) runs through `run_cli`: a
`UserError` (or a missing file) prints one line, `error: <what is wrong, which field or path, what to do>`, and
exits 2; the traceback is printed only with `--verbose`. Anything else is a bug and keeps its traceback.
`UserError` subclasses `ValueError`, so library callers that catch `ValueError` keep working.
Exceptions that are user errors by nature (a checkpoint written by another config, a held workdir lock, a
non-finite loss) subclass `UserError` where they are defined. `call_cli` is `run_cli` without the
exit: it returns the exit code (for entry points driven in-process, e.g. `marval_jax.main.cli`).
"""
from __future__ import annotations

import sys
from typing import Callable

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A bad input the user can fix; its message is the whole story, on one line."""


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError))


def one_line(exc: BaseException) -> str:
    """The message of `exc` folded onto one line (multi-line messages keep their content, joined by '; ')."""
    parts = [p.strip() for p in str(exc).splitlines() if p.strip()]
    return "; ".join(parts) or type(exc).__name__


def verbose_requested(argv: list[str]) -> bool:
    return any(a in ("--verbose", "--verbose=true", "--verbose=True", "-v") for a in argv)


def add_verbose_flag(parser) -> None:
    """`--verbose` on an argparse parser (run_cli reads it from argv: the traceback of user errors too)."""
    parser.add_argument("--verbose", action="store_true", help="on a user error, print the traceback too")


def report(exc: BaseException) -> int:
    """Print the one `error:` line of a user error to stderr; returns EXIT_USER_ERROR."""
    print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def call_cli(main: Callable[[], object], argv: list[str] | None = None) -> object:
    """Run `main()` and return its result; a user error prints one line and returns EXIT_USER_ERROR (with
    --verbose in `argv` it is raised, traceback and all). Bugs and SystemExit propagate."""
    argv = sys.argv if argv is None else argv
    try:
        return main()
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - sorted into user error vs bug below
        if not is_user_error(exc) or verbose_requested(argv):
            raise
        return report(exc)


def run_cli(main: Callable[[], object], argv: list[str] | None = None) -> None:
    """Run `main()`; on a user error print one line to stderr and exit 2 (traceback only with --verbose)."""
    result = call_cli(main, argv)
    if isinstance(result, int) and not isinstance(result, bool):
        sys.exit(result)
