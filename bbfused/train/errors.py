"""The errors the command turns into exit code 2: each message names the problem and the fix.

They live apart from the modules that raise them so that the command can catch them without importing torch
(``--help`` and a mistyped option stay fast).
"""

from __future__ import annotations


class UsageError(ValueError):
    """A command-line input that cannot work; the message names the problem and the fix."""


class DataError(ValueError):
    """The data cannot be used as given; the message names the problem and the fix."""


class OutputError(OSError):
    """An output that cannot be written (a full disk); the message names the problem and the fix."""


class RunComplete(Exception):
    """``--auto-resume`` found the run already trained to its last epoch: nothing to do (exit code 0)."""
