"""The one base class of every error a user can fix by changing a config, a file or a flag.

The CLI prints these as ``error: ...`` (exit 2) instead of a traceback; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the file, line or field and what to change."""


class ModelLoadError(UserError, RuntimeError):
    """A model or tokenizer that cannot be found or loaded (path, alias, weights format)."""
