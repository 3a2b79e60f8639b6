"""The ``medfoundry`` command line: one subcommand per module in :mod:`medfoundry_cli.commands`.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; its docstring's first
line is the help text. A problem with the user's input (:class:`~medfoundry.errors.UserError`: a config
value, a missing or corrupt file; or a missing/unreadable path) is printed as one line
``medfoundry <command>: error: <message>`` on stderr with exit code 2 and no traceback; the traceback goes
to ``error.log`` in the run folder when the command knows one that exists (a command sets
``args.error_log_dir``), else to ``./medfoundry-error.log``, and the line says which. A config error
writes no log: its message is complete. Anything else is a bug and keeps its traceback on the terminal; once
the run folder exists it is also appended to that folder's ``error.log`` (the one file a user attaches to a bug
report), and the last line says so.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medfoundry import __version__

COMMANDS = (
    "train",
    "config",
    "recipes",
    "models",
    "prepare",
    "eval",
    "export",
    "convert",
    "attention",
    "report",
    "demo",
    "bench",
    "sweep",
    "launch",
)

USER_EXIT_CODE = 2
FALLBACK_LOG = "medfoundry-error.log"
# OS errors that a user's path causes (a typo, a folder for a file, no permission), reported like UserError
USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
TRUST_HELP = ("read .pt/.pth files that need Python objects beyond tensors and numpy arrays (a pickle that can "
              "run code) instead of refusing them; only for files you or a colleague wrote "
              "(sets MEDFOUNDRY_TRUST_PICKLE=1)")


def _load_commands() -> dict:
    return {name: importlib.import_module(f"medfoundry_cli.commands.{name}") for name in COMMANDS}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The argument parser with every available subcommand (each also accepts ``--trust-pickle``)."""
    parser = argparse.ArgumentParser(
        prog="medfoundry",
        description="Vision foundation models for medical imaging.",
        epilog="Exit code 2: a problem with the input (config value, missing or corrupt file), reported in one "
               "line; the traceback is written to error.log in the run folder or ./medfoundry-error.log.",
    )
    parser.add_argument("--version", action="version", version=f"medfoundry {__version__}")
    parser.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = _load_commands()
    for name, module in modules.items():
        doc = (module.__doc__ or "").strip().splitlines()
        help_text = doc[0] if doc else name
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        # SUPPRESS: an absent flag after the command must not reset one given before it
        p.add_argument("--trust-pickle", action="store_true", default=argparse.SUPPRESS, help=TRUST_HELP)
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; returns the process exit code."""
    from medfoundry.errors import UserError

    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return USER_EXIT_CODE
    with _trust_pickle(bool(getattr(args, "trust_pickle", False))):
        try:
            register_name_catalogs()
            return int(modules[args.command].run(args) or 0)
        except (UserError, *USER_OS_ERRORS) as err:
            return report_user_error(args, err)
        except Exception as err:
            log_bug(args, err)
            raise


def register_name_catalogs() -> None:
    """Import the registries whose names configs are checked against (backbones, data kinds, eval tasks).

    The config package cannot import them (it sits below them); each registers its catalog in
    :mod:`medfoundry.config.names` on import, so every command's ``load_config`` refuses an unknown name.
    """
    import medfoundry.data.sources  # noqa: F401
    import medfoundry.eval.registry  # noqa: F401
    import medfoundry.methods  # noqa: F401  (the methods' config classes: ``method: NAME``)
    import medfoundry.models.registry  # noqa: F401


@contextmanager
def _trust_pickle(on: bool) -> Iterator[None]:
    """Set ``MEDFOUNDRY_TRUST_PICKLE=1`` for the command when asked (restored after, for in-process callers)."""
    from medfoundry.safe_load import TRUST_ENV

    before = os.environ.get(TRUST_ENV)
    if on:
        os.environ[TRUST_ENV] = "1"
    try:
        yield
    finally:
        if on and before is None:
            os.environ.pop(TRUST_ENV, None)
        elif on:
            os.environ[TRUST_ENV] = before


def report_user_error(args: argparse.Namespace, err: BaseException) -> int:
    """Print the one-line error (plus the message's own hint lines), log the traceback, return exit code 2."""
    from medfoundry.config.loader import ConfigError

    message = user_message(err)
    where = "" if isinstance(err, ConfigError) else _write_traceback(args, err)
    suffix = f" [traceback: {where}]" if where else ""
    print(f"medfoundry {args.command}: error: {message}{suffix}", file=sys.stderr)
    return USER_EXIT_CODE


def log_bug(args: argparse.Namespace, err: BaseException) -> str:
    """Append a bug's traceback to the run folder's ``error.log`` when that folder exists; returns the path or "".

    A failure that is not the user's input (a bug, an out-of-memory error, a library's exception) still
    propagates with its traceback; writing it into the run folder too means no failure of a run that
    already has a folder leaves that folder without an ``error.log``.
    """
    folder = getattr(args, "error_log_dir", None)
    if not folder or not Path(folder).is_dir():
        return ""
    where = _write_traceback(args, err)
    if where:
        print(f"medfoundry {args.command}: unexpected {type(err).__name__}; traceback also written to {where} "
              "(attach it to a bug report)", file=sys.stderr)
    return where


def user_message(err: BaseException) -> str:
    """The error's own message, without the worker traceback a DataLoader wraps around it.

    A failure in a DataLoader worker is re-raised as ``Caught X in DataLoader worker process 0. Original
    Traceback ...`` with the original message on the last line(s); that text is what the user needs.
    """
    text = str(err).strip() or type(err).__name__
    if text.startswith("Caught ") and "Original Traceback" in text:
        marker = f"{type(err).__name__}: "
        if marker in text:
            text = text.rsplit(marker, 1)[1].strip()
    return text


def _write_traceback(args: argparse.Namespace, err: BaseException) -> str:
    """Append the traceback to the run's ``error.log`` or ``./medfoundry-error.log``; returns the path written."""
    if os.environ.get("RANK", "0") != "0":
        return ""  # one log per run: the main rank writes it
    folder = getattr(args, "error_log_dir", None)
    path = Path(folder) / "error.log" if folder and Path(folder).is_dir() else Path(FALLBACK_LOG)
    try:
        with open(path, "a") as fh:
            fh.write(f"medfoundry {args.command}: {type(err).__name__}\n")
            fh.write("".join(traceback.format_exception(type(err), err, err.__traceback__)))
            fh.write("\n")
    except OSError:
        return ""
    return str(path)


if __name__ == "__main__":
    raise SystemExit(main())
