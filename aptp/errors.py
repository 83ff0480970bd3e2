"""Errors caused by bad user input.

The CLI catches :class:`AptpUserError`, prints ``str(exc)`` as one line and exits with
code 2 (no traceback). Anything else is a bug: exit 1 with the traceback in a log file.
So messages must fit on one line, quote the offending value and say what to do.
"""

from __future__ import annotations


class AptpUserError(Exception):
    """Bad input; the CLI prints ``str(exc)`` as one line and exits 2."""


class SettingsError(AptpUserError):
    """A recipe, environment variable, flag or ``--set`` value is invalid."""


class OutputExistsError(AptpUserError):
    """The output directory is not empty and neither --overwrite nor --resume was given."""


class ModelNotFoundError(AptpUserError):
    """A model alias, local folder or hub id could not be found."""


class DataError(AptpUserError):
    """A data set is missing, malformed or empty."""
