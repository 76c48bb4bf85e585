"""Errors a person can act on.

Every error raised for bad input (config, data, model, output directory) is a `TunesmithError`: the CLI prints
its message in one or two lines and exits non-zero, without a traceback. Anything else is a bug and keeps its
traceback.
"""


class TunesmithError(Exception):
    """A problem with the user's input, explained in the message together with what to do about it."""


class ConfigError(TunesmithError):
    """A config key or value is wrong."""


class DataError(TunesmithError):
    """A dataset is missing, malformed or yields nothing to train on."""


class ModelError(TunesmithError):
    """A model cannot be found or loaded."""


class OutputDirError(TunesmithError):
    """The output directory holds something that this run must not overwrite or resume from."""


class DiskFullError(OutputDirError):
    """A checkpoint or output could not be written because its file system is full."""


class NotSupportedYet(ConfigError):
    """A valid key whose feature tunesmith does not implement yet."""
