import os
import stat

import pytest

from hpml import files
from hpml.errors import UsageError, WriteFailed


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


def test_a_name_the_file_system_cannot_hold_is_refused_before_it_is_written(tmp_path):
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    assert files.check_name_fits(tmp_path / "new", "a" * 40, "results file") == tmp_path / "new" / ("a" * 40)
    with pytest.raises(UsageError, match="results file .* cannot be written: its path is longer than the file system"):
        files.check_name_fits(tmp_path, "a" * (name_max + 1), "results file")
    with pytest.raises(UsageError, match="longer than the file system allows"):  # the whole path, not one name
        files.check_name_fits(tmp_path.joinpath(*["d" * 200] * 20), "x.json", "results file")


def test_a_failed_write_is_one_line_naming_the_file_and_the_cause(tmp_path):
    path = tmp_path / ("a" * (os.pathconf(tmp_path, "PC_NAME_MAX") + 1))
    with pytest.raises(WriteFailed) as refused, files.write_errors_in_one_line(path, "; rerun"):
        files.write_atomic(path, lambda tmp: tmp.write_text("{}"))
    assert str(refused.value) == f"cannot write {path}: File name too long; rerun"
