"""hpml.cifar10_download against a local HTTP server on 127.0.0.1 serving small archives of the official layout."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from hpml import cifar10_download, data
from hpml.errors import UsageError
from tests.helpers import run_without_torch


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(the folder it serves, its address)."""
    folder = tmp_path_factory.mktemp("www")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def archive(folder: Path, name: str, members: dict[str, bytes]) -> str:
    """A .tar.gz of `members` in `folder`; its MD5."""
    with tarfile.open(folder / name, "w:gz") as tar:
        for member, content in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return hashlib.md5((folder / name).read_bytes()).hexdigest()


def official_layout(batches_dir: Path, **replaced: bytes) -> dict[str, bytes]:
    """The members of CIFAR-10's archive (batches from the batches_dir fixture, a meta file and a readme), some
    replaced."""
    names = [*data.TRAIN_BATCHES, *data.TEST_BATCHES]
    members = {f"cifar-10-batches-py/{name}": (batches_dir / data.BATCHES_FOLDER / name).read_bytes() for name in names}
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": [b"airplane"]})
    members["cifar-10-batches-py/readme.html"] = b"<html></html>"
    return {**members, **{f"cifar-10-batches-py/{name}": content for name, content in replaced.items()}}


def test_download_writes_the_npz_layout_with_the_archives_images(server, batches_dir, tmp_path):
    www, address = server
    md5 = archive(www, "good.tar.gz", official_layout(batches_dir))
    written = cifar10_download.download_cifar10(tmp_path / "cifar", f"{address}/good.tar.gz", md5, quiet=True)
    assert sorted(path.name for path in written) == ["test.npz", "train.npz"]
    assert sorted(os.listdir(tmp_path / "cifar")) == ["test.npz", "train.npz"]  # no archive or temp file left
    downloaded, original = data.load_cifar10(tmp_path / "cifar"), data.load_cifar10(batches_dir)
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert np.array_equal(getattr(downloaded, field), getattr(original, field)), field


class Runs:
    def __reduce__(self):
        return (os.system, ("touch ran",))


@pytest.mark.parametrize(("case", "error"), [
    ("wrong md5", "MD5 .* expected 0{32}: not CIFAR-10's archive, nothing written"),
    ("code in a batch", "refused: it asks for posix.system"),
    ("a batch missing", "the archive has no test_batch under cifar-10-batches-py/"),
    ("not found", "cannot download CIFAR-10 from .*: HTTP Error 404"),
    ("a space", "cannot download CIFAR-10 from .*: URL can't contain control characters"),
])
def test_a_bad_archive_is_one_line_and_writes_nothing(case, error, server, batches_dir, tmp_path, monkeypatch):
    www, address = server
    members = official_layout(batches_dir, data_batch_3=pickle.dumps({b"data": Runs(), b"labels": []}))
    if case == "a batch missing":
        members = {name: content for name, content in official_layout(batches_dir).items() if "test_batch" not in name}
    name = case.replace(" ", "-")
    md5 = archive(www, f"{name}.tar.gz", members if case != "wrong md5" else official_layout(batches_dir))
    url = {"not found": f"{address}/nothing.tar.gz", "a space": f"{address}/a b.tar.gz"}.get(case,
                                                                                          f"{address}/{name}.tar.gz")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=error):
        cifar10_download.download_cifar10(tmp_path / "cifar", url, "0" * 32 if case == "wrong md5" else md5, True)
    assert os.listdir(tmp_path / "cifar") == [] and not (tmp_path / "ran").exists()


def test_the_command_needs_no_torch(server, batches_dir, tmp_path):
    www, address = server
    md5 = archive(www, "cli.tar.gz", official_layout(batches_dir))
    done = run_without_torch("hpml.cifar10_download", str(tmp_path / "cifar"), "--url", f"{address}/cli.tar.gz",
                             "--md5", md5, "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"wrote {tmp_path / 'cifar' / name}" for name in data.NPZ_FILES]
    refused = run_without_torch("hpml.cifar10_download", str(tmp_path / "other"), "--md5", "abc")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "--md5 must be 32 hexadecimal digits, got 'abc'" in refused.stderr
