"""Writing a file so that a crash never leaves half of it, and proving a folder can be written."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import UsageError

_UMASK = os.umask(0o022)
os.umask(_UMASK)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def write_atomic(path: str | Path, write: Callable[[Path], None], *, overwrite: bool = True) -> Path:
    """Let `write` fill a temp file beside `path`, flush it to disk, then rename it into place.

    With overwrite=False an existing `path` is left alone and FileExistsError raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are for sharing
        write(tmp)
        with open(tmp, "rb") as file:
            os.fsync(file.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if `path` exists
    except OSError as error:
        if error.errno in DISK_FULL:  # name the file that was asked for, not its temp file
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def inside(folder: str | Path, name: object, what: str) -> Path:
    """`folder`/`name` for a name read from a file that travels (a run id, a listed file, an archive member): a
    plain relative path of non-empty parts that stays inside `folder` (no '..', no absolute path, no NUL, no link
    out of it); ValueError naming `what` and the name otherwise."""
    text = name if isinstance(name, str) else None
    parts = Path(text).parts if text else ()
    if not text or "\0" in text or Path(text).is_absolute() or any(part in ("..", "") for part in parts):
        raise ValueError(f"{what} {name!r} is not a plain name inside {folder}")
    base = Path(folder).resolve()
    path = base.joinpath(*parts)
    if not path.resolve().is_relative_to(base):
        raise ValueError(f"{what} {name!r} leads outside {folder} (through a link)")
    return path


def copy_atomic(source: str | Path, path: str | Path) -> Path:
    """Copy `source` to `path` through a temp file and a rename (see write_atomic)."""
    return write_atomic(path, lambda tmp: shutil.copyfile(source, tmp))


def check_writable(folder: str | Path, what: str) -> Path:
    """Create `folder` if needed and prove a file can be written there; UsageError naming `what` otherwise."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UsageError(f"{what} {folder} is not writable: {error.strerror or error}") from None
    return path


def check_output_file(path: str | Path, flag: str) -> Path:
    """Refuse an output file that is a folder, or lies under a file or an unwritable folder; create its folder."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    blocker = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"{flag} {path} cannot be written: {blocker} is a file, not a folder")
    check_writable(path.parent, f"{flag} folder")
    return path
