"""Errors that the command line turns into one line and a non-zero exit.

Every error raised for bad *input* (a file, a key, a value the user gave) is a
:class:`MedsslError`. Its message names the offending file or key. Anything
else escaping the CLI is a bug and is shown with a traceback.
"""

from __future__ import annotations


class MedsslError(Exception):
    """Base class: a problem with what the user gave us (exit code 2)."""

    exit_code = 2


class DataError(MedsslError):
    """A dataset, a volume or a label file is missing, corrupt or inconsistent."""


class ConfigError(MedsslError):
    """An unknown config key, a value of the wrong type, an impossible setting."""


class TrainingError(MedsslError):
    """Training cannot go on (non-finite loss, incompatible checkpoint)."""

    exit_code = 3
