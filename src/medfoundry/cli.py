"""The ``medfoundry`` command line: one subcommand per module in :mod:`medfoundry.commands`.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; its docstring's first
line is the help text. Configuration errors exit with code 2 and a message naming the key.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = (
    "train",
    "config",
    "recipes",
    "models",
    "prepare",
    "eval",
    "export",
    "attention",
    "report",
    "demo",
    "bench",
    "sweep",
    "launch",
)


def _load_commands() -> dict:
    return {name: importlib.import_module(f"medfoundry.commands.{name}") for name in COMMANDS}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="medfoundry", description="Vision foundation models for medical imaging."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = _load_commands()
    for name, module in modules.items():
        doc = (module.__doc__ or "").strip().splitlines()
        help_text = doc[0] if doc else name
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; returns the process exit code."""
    from medfoundry.config import ConfigError

    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(modules[args.command].run(args) or 0)
    except ConfigError as err:
        print(f"medfoundry {args.command}: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
