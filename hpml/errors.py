"""The one exception the scripts turn into a one-line message and a non-zero exit."""


class UsageError(Exception):
    """Bad input from the user (a flag, a data folder, an output path): reported as one line."""
