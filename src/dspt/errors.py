"""dspt's own error classes: the CLI prints these as one line that names the problem and the fix.

Anything else (a bug, a library's error) keeps its traceback, so it can be reported and fixed. Each class
also derives from the built-in type that callers of earlier versions caught (ValueError, RuntimeError).
"""
from __future__ import annotations


class DsptError(Exception):
    """Base of every error whose message already says what went wrong and how to fix it."""


class ConfigError(DsptError, ValueError):
    """A bad option: the message names it and the accepted values."""


class DataError(DsptError, ValueError):
    """Bad or missing data: the message names the file or folder and the fix."""


class BackboneError(DsptError, ValueError):
    """Bad model name, pretrained tag or checkpoint: the message names the fix."""


class TrainingError(DsptError, RuntimeError):
    """The run cannot continue (non-finite loss, a different run in the output folder, ...)."""
