"""Errors a user can fix. The command-line entry points print them as one line, no traceback."""


class UserError(Exception):
    """Bad input or configuration: the message says what, where and how to fix it."""


class DataError(UserError):
    """A data directory, shard, sample or label that cannot be used."""


class DataChanged(DataError):
    """The data a training started with changed under it (data/watch.py): the run stops."""


class ConfigError(UserError):
    """A configuration that cannot work."""


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss, say); the last good checkpoint is kept."""
