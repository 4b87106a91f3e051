"""The one exception type of the data package."""


class DataError(ValueError):
  """A dataset is missing, malformed or asked for in a way it cannot serve.

  The message always says what was expected, what was found and, where it applies, how to fix it
  (which file to download, which command to run). `python -m data.prepare` prints it and exits 2.
  """
