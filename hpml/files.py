"""Writing a file so that a crash never leaves half of it, and proving a folder can be written."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from hpml.errors import UsageError, WriteFailed, one_line

_UMASK = os.umask(0o022)
os.umask(_UMASK)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def write_atomic(path: str | Path, write: Callable[[Path], None], *, overwrite: bool = True) -> Path:
    """Let `write` fill a temp file beside `path`, flush it to disk, then rename it into place.

    With overwrite=False an existing `path` is left alone and FileExistsError raised.
    """
    path = Path(path)
    prefix = temp_prefix(path.name)
    try:
        _write_through_temp(path, prefix, write, overwrite)
    except OSError as error:
        about = Path(os.fsdecode(error.filename)).name if error.filename else prefix  # no name: the file written
        if error.errno is None or not about.startswith(prefix):
            raise
        # name the file that was asked for, not its temp file; the errno keeps its subclass (FileExistsError...)
        raise OSError(error.errno, error.strerror, str(path)) from error
    return path


def temp_prefix(name: str) -> str:
    """The start of the name of write_atomic's temp file for `name`: short of NAME_MAX whenever `name` is."""
    return f".{name[:40]}."


def _write_through_temp(path: Path, prefix: str, write: Callable[[Path], None], overwrite: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None  # made inside the block, so that an exception a signal raises removes it too
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
        tmp = Path(name)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are for sharing
        write(tmp)
        with open(tmp, "rb") as file:
            os.fsync(file.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if `path` exists
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def shown(path: str | bytes | os.PathLike) -> str:
    """A path for a message or a text file: as it reads, with the bytes that are not UTF-8 escaped ('\\xe9')."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


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


def open_regular(path: str | Path) -> BinaryIO:
    """`path` opened to read, if it is a regular file: a FIFO would block the read for ever and a device (a link to
    /dev/zero) never end it; OSError naming `path` otherwise, as open's own errors do."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO without O_NONBLOCK waits for a writer
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise (IsADirectoryError(errno.EISDIR, "Is a directory", os.fspath(path)) if stat.S_ISDIR(mode) else
                   OSError(errno.EINVAL, "not a regular file (a FIFO, a socket or a device)", os.fspath(path)))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


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


def cannot_write(path: str | Path, error: BaseException) -> str:
    """A failed write in one line, the file and the cause: 'cannot write out/x.json: Read-only file system'."""
    cause = error.strerror if isinstance(error, OSError) and error.strerror else one_line(error, 200)
    return f"cannot write {shown(path)}: {cause}"


@contextmanager
def write_errors_in_one_line(path: str | Path, hint: str = "") -> Iterator[None]:
    """An OSError in the block (a read-only folder, a full disk, a file too large, a name too long) becomes a
    WriteFailed: cannot_write's line, then `hint`."""
    try:
        yield
    except OSError as error:
        raise WriteFailed(cannot_write(path, error) + hint) from None


def check_name_fits(folder: str | Path, name: str, what: str) -> Path:
    """Refuse before the long work a file `name` whose path in `folder`, or that of write_atomic's temp file, the file
    system cannot hold (a name or a path too long for the nearest existing folder's limits); UsageError naming `what`.
    """
    path = Path(folder) / name
    existing = next(parent for parent in path.parents if parent.is_dir())
    name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    for candidate in (path, path.with_name(f"{temp_prefix(name)}XXXXXXXX.tmp")):  # mkstemp adds 8 characters
        if len(os.fsencode(candidate)) >= path_max or any(len(os.fsencode(p)) > name_max for p in candidate.parts):
            text = shown(path)
            raise UsageError(f"{what} {text if len(text) <= 200 else text[:80] + '...' + text[-80:]} cannot be "
                             f"written: its path is longer than the file system allows ({path_max - 1} bytes, "
                             f"{name_max} a name); choose a shorter folder")
    return path


def check_output_file(path: str | Path, flag: str) -> Path:
    """Refuse an output file that is a folder, or lies under a file or an unwritable folder; create its folder."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise UsageError(f"{flag} {path} is not a regular file (a FIFO, a socket or a device); give a file name")
    blocker = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"{flag} {path} cannot be written: {blocker} is a file, not a folder")
    check_writable(path.parent, f"{flag} folder")
    return path
