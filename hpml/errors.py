"""The one exception the scripts turn into a one-line message and a non-zero exit."""


class UsageError(Exception):
    """Bad input from the user (a flag, a data folder, an output path): reported as one line."""


class RunStopped(Exception):
    """Training stopped early (a signal, a diverging loss): one line, its own exit code, checkpoint kept."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
