"""The exceptions the scripts turn into a one-line message and a non-zero exit, and that one-line form."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import TracebackType


class UsageError(Exception):
    """Bad input from the user (a flag, a data folder, an output path): reported as one line."""


class WriteFailed(Exception):
    """A file could not be written (a full disk, a read-only folder, a file-size limit, a name too long): one line,
    files.cannot_write's, and exit code 1. A flag whose folder cannot be written is refused before any work instead,
    as bad input (UsageError)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM inside cli.terminate_like_ctrl_c, raised where Ctrl-C raises KeyboardInterrupt, so that `with` and
    `finally` blocks clean up as they do for Ctrl-C: one line and exit code 143 (128 + SIGTERM)."""


class RunStopped(Exception):
    """Training stopped early (a signal, a diverging loss): one line, its own exit code, checkpoint kept. `agreed`:
    every rank stops with it at the same step, so that rank 0 alone need say it."""

    def __init__(self, message: str, exit_code: int, agreed: bool = False) -> None:
        super().__init__(message)
        self.exit_code, self.agreed = exit_code, agreed


def one_line(error: object, limit: int | None = None) -> str:
    """An error's message on one line (at most `limit` characters), or its type's name when it has none."""
    text = " ".join(str(error).split())[:limit]
    return text or type(error).__name__


def one_line_on_ctrl_c() -> None:
    """Make a Ctrl-C that no code catches (one while torch loads, before main runs) end the script with one line
    and exit code 130, as cli.run_script does for one inside main, instead of a traceback.

    Called by the scripts that import torch at their top, before they do.
    """
    previous = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        if not issubclass(kind, KeyboardInterrupt):
            previous(kind, error, traceback)
            return
        print(f"{script_name()}: interrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)  # Python would otherwise end by raising SIGINT on itself after the hook

    sys.excepthook = hook


def script_name() -> str:
    """The running script's file name (or console script's name), to start its one-line messages with."""
    return Path(sys.argv[0]).name


def script_command() -> list[str]:
    """How to start the running script again, for the commands it prints: `python -m <module>` when it was run as a
    module, its console script's name (hpml-sagemaker), or `python <its file name>`."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is not None:
        return ["python", "-m", spec.name]
    name = script_name()
    return ["python", name] if name.endswith(".py") else [name]
