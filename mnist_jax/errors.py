"""Errors that are the user's to fix: `launch.py` prints them as one line."""


class UserError(Exception):
  """Bad input (config, data, checkpoint) with a message saying what to do.

  `launch.py` prints `Error: <message>` and exits with status 2 instead of a
  traceback; library callers can catch it like any exception.
  """


class ConfigError(UserError, ValueError):
  """An invalid configuration value, found before any work starts."""


class DataError(UserError):
  """MNIST could not be found, downloaded or parsed."""


class CheckpointError(UserError):
  """A checkpoint is missing, unreadable or does not fit the model."""


class NonFiniteLossError(UserError, FloatingPointError):
  """The training loss or state became NaN or infinite."""
