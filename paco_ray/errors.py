"""The one base class of every bad-input error, so each CLI catches them in one place."""
from __future__ import annotations


class InputError(ValueError):
    """Bad input (config, data, checkpoint, CLI value); the message is one line naming the culprit."""


class MissingInputError(InputError, FileNotFoundError):
    """An input file or directory that does not exist; the message names it."""


class CheckpointError(InputError):
    """A checkpoint that cannot be used; the message names the file."""
