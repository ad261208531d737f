"""Errors a user can fix. The command line prints their message on one line, without a traceback."""


class UserError(Exception):
    """Bad data, configuration or files: the message names the thing and says what to do."""


class DataError(UserError):
    """A data path or corpus that cannot be used."""


class ConfigError(UserError):
    """An unknown key or an out-of-range value in a run configuration."""


class CheckpointError(UserError):
    """A missing, truncated or foreign checkpoint."""
