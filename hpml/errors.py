"""The exceptions the scripts turn into a one-line message and a non-zero exit, and that one-line form."""


class UsageError(Exception):
    """Bad input from the user (a flag, a data folder, an output path): reported as one line."""


class RunStopped(Exception):
    """Training stopped early (a signal, a diverging loss): one line, its own exit code, checkpoint kept."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def one_line(error: object, limit: int | None = None) -> str:
    """An error's message on one line (at most `limit` characters), or its type's name when it has none."""
    text = " ".join(str(error).split())[:limit]
    return text or type(error).__name__
