"""The one exception type the converter raises for bad input."""


class ConvertError(ValueError):
    """Bad input for the converter; the message names the file and the problem, on one line."""
