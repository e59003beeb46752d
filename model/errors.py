"""User-facing errors.

Anything a user can cause (bad config, missing file, wrong shape, broken checkpoint) raises a
`BitMambaError` subclass whose message names the problem (file, key, shape, line). The CLI prints
the message alone (no traceback) unless BITMAMBA_DEBUG=1.
"""


class BitMambaError(Exception):
    """An error caused by user input, with a message meant to be read by that user."""


class ConfigError(BitMambaError, ValueError):
    """A config value is missing, unknown, of the wrong type or conflicts with another."""


class CheckpointError(BitMambaError):
    """A checkpoint or model file is missing, truncated, or does not fit the architecture."""


class DataError(BitMambaError):
    """A dataset or input file is missing, empty or malformed."""
