"""Errors a user can cause and fix; the CLI prints them as one line and exits with status 2."""


class DownpourError(Exception):
    """Base of every error that is the input's fault, not a bug."""


class ConfigError(DownpourError, ValueError):
    """A config key, type or value is wrong; the message names the key and echoes the value."""


class CheckpointError(DownpourError):
    """A checkpoint is missing, corrupt, or belongs to another model or shape."""


class DataError(DownpourError):
    """A data source cannot be read or is too small for the requested split."""
