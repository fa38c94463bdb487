"""Download CIFAR-10's official archive into the npz layout (train.npz, test.npz) that the scripts read and
`sagemaker_submission.py submit --data-dir` uploads. No torch: a laptop that only submits jobs can run it.

    python -m hpml.cifar10_download ~/cifar10

The archive is checked against its published MD5 before anything in it is read; only its six batch files are read,
each through data.load_batch's restricted unpickler (numpy arrays, lists, dicts, bytes; nothing is called), and
the npz files are written through temp files, so an interrupted download leaves no partial data set.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import re
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np
from tqdm import tqdm

from hpml import files
from hpml.data import BATCHES_FOLDER, NPZ_FILES, TEST_BATCHES, TRAIN_BATCHES, batch_arrays, checked, unpickle_batch
from hpml.errors import UsageError, one_line, script_command

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"  # published beside the archive on its page
MAX_ARCHIVE_BYTES = 200 * 2**20  # the archive is 163 MiB
MAX_BATCH_BYTES = 40 * 2**20  # each batch is 30 MiB
CHUNK = 2**20


def download_cifar10(folder: Path, url: str | None = None, md5: str = MD5, quiet: bool = False) -> list[Path]:
    """CIFAR-10 from `url` (the official archive by default) into `folder` as train.npz and test.npz; the files
    written. UsageError (one line) when the download fails, its checksum differs or the archive is not CIFAR-10's."""
    folder, url = Path(folder), url or URL
    files.check_writable(folder, "the CIFAR-10 folder")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".cifar10-download.") as scratch:
        archive = Path(scratch) / "cifar-10-python.tar.gz"
        _fetch(url, archive, md5, quiet)
        splits = _read_batches(archive, url)
    written = []
    for name, (images, labels) in zip(NPZ_FILES, splits, strict=True):
        written.append(files.write_atomic(folder / name, lambda tmp, i=images, n=labels: _save_npz(tmp, i, n)))
    return written


def _fetch(url: str, archive: Path, md5: str, quiet: bool) -> None:
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
            size = int(response.headers.get("Content-Length") or 0)
            if size > MAX_ARCHIVE_BYTES:
                raise UsageError(f"{url} is {size:,} bytes, more than CIFAR-10's archive ({MAX_ARCHIVE_BYTES:,} at "
                                 "most): not downloaded")
            with tqdm(total=size or None, unit="B", unit_scale=True, desc="CIFAR-10", disable=quiet) as bar:
                while chunk := response.read(CHUNK):
                    if out.tell() + len(chunk) > MAX_ARCHIVE_BYTES:
                        raise UsageError(f"{url} sent more than {MAX_ARCHIVE_BYTES:,} bytes, more than CIFAR-10's "
                                         "archive: download stopped, nothing written")
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, ValueError) as error:  # statuses, hosts, URLs
        raise UsageError(f"cannot download CIFAR-10 from {url}: {one_line(error)}") from None
    except OSError as error:
        if error.filename:  # writing the archive
            raise
        raise UsageError(f"cannot download CIFAR-10 from {url}: {one_line(error)}") from None
    if digest.hexdigest() != md5.lower():
        raise UsageError(f"{url}: MD5 {digest.hexdigest()}, expected {md5}: not CIFAR-10's archive, nothing written")


def _read_batches(archive: Path, url: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) of the train and test splits, from the batch files of the archive and nothing else."""
    wanted = {f"{BATCHES_FOLDER}/{name}": name for name in (*TRAIN_BATCHES, *TEST_BATCHES)}
    batches = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.name not in wanted:
                    continue
                if not member.isfile() or member.size > MAX_BATCH_BYTES:
                    raise UsageError(f"{url}: {member.name} is not a batch file of at most {MAX_BATCH_BYTES:,} bytes")
                batches[wanted[member.name]] = batch_arrays(unpickle_batch(tar.extractfile(member)))
    except UsageError:
        raise
    except (tarfile.TarError, OSError, EOFError) as error:
        raise UsageError(f"{url}: cannot read the archive: {one_line(error)}") from None
    except Exception as error:  # an unpickled batch of the wrong shape, or one asking for code, fails in many ways
        raise UsageError(f"{url}: a batch file is not CIFAR-10's: {one_line(error)}") from None
    missing = [name for name in wanted.values() if name not in batches]
    if missing:
        raise UsageError(f"{url}: the archive has no {', '.join(missing)} under {BATCHES_FOLDER}/")
    return [checked(np.concatenate([batches[name][0] for name in names]),
                    np.concatenate([batches[name][1] for name in names]), url)
            for names in (TRAIN_BATCHES, TEST_BATCHES)]


def _save_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    with open(path, "wb") as file:  # a file object: np.savez would add .npz to a name
        np.savez(file, images=images, labels=labels)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=" ".join(script_command()),  # python -m hpml.cifar10_download, or hpml-cifar10-download
        description="Download CIFAR-10's official archive, check its MD5, and write train.npz and test.npz (images "
                    "uint8 (N, 32, 32, 3), labels) into FOLDER: the layout the training scripts read and "
                    "sagemaker_submission.py submit --data-dir uploads. Needs no torch.")
    parser.add_argument("folder", type=Path, help="where to write train.npz and test.npz (made if missing)")
    parser.add_argument("--url", default=URL, help="the archive's address (default: %(default)s)")
    parser.add_argument("--md5", default=MD5, help="its MD5, checked before it is read (default: the official "
                                                   "archive's, %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[0-9a-fA-F]{32}", args.md5):
        raise UsageError(f"--md5 must be 32 hexadecimal digits, got {args.md5!r}")
    for path in download_cifar10(args.folder, args.url, args.md5, args.quiet):
        print(f"wrote {files.shown(path)}")
    return 0


def run_as_script() -> NoReturn:
    """main on the command line, as `python -m hpml.cifar10_download` and hpml-cifar10-download run it."""
    from hpml.cli import run_script

    run_script(main)


if __name__ == "__main__":
    run_as_script()
