"""The project's error for a foreseeable bad input: a file, a setting or a flag the user can fix.

Library code raises a `UserError` (or one of its kinds: ConfigError, ShardError, WeightsError,
...) whose message is one line naming the file or setting and the fix; `avs-dist`'s main
(cli.py) catches it once and prints `avs-dist <command>: error: <message>`, exit status 2,
without a traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """A bad input the user can fix; the message says which and how."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class BadFileError(UserError, ValueError):
    """A file the user named exists but is not what the command needs."""
