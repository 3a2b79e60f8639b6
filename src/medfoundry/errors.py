"""The error types a user can cause, so the command line can report them in one line.

Every exception that a bad input (a file, a config value, a folder) provokes derives from
:class:`UserError`: the CLI prints its message and exits with code 2 without a traceback, and writes the
traceback to ``error.log`` for a bug report. Anything else is a bug in medfoundry and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user handed us; the message names the file, key or value and the fix."""


class UnsafeFileError(UserError):
    """A weights or checkpoint file that can only be read by running code from it (a pickle with globals)."""


class CorruptFileError(UserError):
    """A file that is truncated, empty, not in the expected format, or fails its recorded checksum."""


class UnreadableDataError(UserError, RuntimeError):
    """Every sample tried in a row failed to load; the message lists the distinct files and their reasons."""
