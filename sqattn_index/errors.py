"""Typed errors of sqattn_index.

Every error is a ``SqattnError`` and also inherits the matching built-in, so callers can catch either.
Messages say what was expected, what came, and what to do.
"""

__all__ = [
    "SqattnError",
    "ConfigError",
    "ModelLoadError",
    "UnsupportedModelError",
    "ContextTooLongError",
    "CorruptIndexError",
    "IncompatibleModelError",
    "IndexFormatError",
    "IndexLockedError",
    "EvalTaskError",
]


class SqattnError(Exception):
    """Base class of every error raised by sqattn_index."""


class ConfigError(SqattnError, ValueError):
    """A setting or argument has a value that cannot work."""


class ModelLoadError(SqattnError, OSError):
    """A model could not be found, fetched or loaded."""


class UnsupportedModelError(SqattnError, TypeError):
    """The model's attention is not RoPE + the transformers attention interface."""


class ContextTooLongError(SqattnError, ValueError):
    """The corpus or question is longer than the model's positions allow."""


class CorruptIndexError(SqattnError, OSError):
    """A persisted index file is missing, truncated or fails its checksum."""


class IncompatibleModelError(SqattnError, ValueError):
    """A persisted index was built with another model or tokenizer."""


class IndexFormatError(SqattnError, ValueError):
    """A persisted index has a format version this code cannot read."""


class IndexLockedError(SqattnError, RuntimeError):
    """Another writer holds the index."""


class EvalTaskError(SqattnError, ValueError):
    """An evaluation task file is malformed."""
