"""Rewrite a trusted legacy .pt/.pth file as plain data that loads without running code: medfoundry convert IN OUT."""

from __future__ import annotations

import argparse

from medfoundry.safe_load import convert_legacy_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="the legacy file (you or a colleague wrote it: reading it runs its code)")
    parser.add_argument("dst", help="where to write the converted file")


def run(args: argparse.Namespace) -> int:
    """Convert ``args.src`` into ``args.dst`` (:func:`medfoundry.safe_load.convert_legacy_file`).

    Content that is not plain data raises ``TypeError`` naming where it sits; it is reported as a user error
    (one line, exit 2) like a missing or corrupt file.
    """
    from medfoundry.errors import UserError

    try:
        out = convert_legacy_file(args.src, args.dst)
    except TypeError as err:
        raise UserError(str(err)) from err
    print(f"wrote {out}: loads with the safe reader")
    return 0
