import os
import stat

import pytest

from hpml import files
from hpml.errors import UsageError


def test_a_failed_write_keeps_the_older_file(tmp_path):
    older = tmp_path / "Time.png"
    older.write_bytes(b"older good figure")

    def crash_half_way(tmp):
        tmp.write_bytes(b"\x89PNG half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        files.write_atomic(older, crash_half_way)
    assert older.read_bytes() == b"older good figure" and [p.name for p in tmp_path.iterdir()] == ["Time.png"]


def test_replace_or_refuse_to_overwrite(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    files.write_atomic(path, lambda tmp: tmp.write_text("one"))
    files.write_atomic(path, lambda tmp: tmp.write_text("two"))
    assert path.read_text() == "two"
    with pytest.raises(FileExistsError):
        files.write_atomic(path, lambda tmp: tmp.write_text("three"), overwrite=False)
    assert path.read_text() == "two" and os.listdir(path.parent) == ["a.txt"]
    assert stat.S_IMODE(path.stat().st_mode) & 0o044  # readable by others, unlike mkstemp's 0600


def test_check_writable_names_the_folder(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="checkpoint folder .*/file/sub is not writable"):
        files.check_writable(tmp_path / "file" / "sub", "checkpoint folder")
    assert files.check_writable(tmp_path / "new", "output folder").is_dir()
