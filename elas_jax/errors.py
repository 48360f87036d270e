"""Error types for problems in the user's input (reported as one line, exit 2)."""


class UserError(Exception):
  """An error caused by the user's input: config, data files, paths."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message names the field."""


class DataError(UserError, ValueError):
  """Unusable data: the message names the file (and line or record where it applies)."""
