import errno
import json
import subprocess
import sys

import pytest

from hpml import results
from hpml.config import TrainConfig
from hpml.errors import UsageError
from tests.helpers import REPO, record


def test_summary_uses_median_after_warm_up_and_finds_best():
    summary = record()
    assert summary["total_train_time_s"] == 8.5
    assert summary["median_images_per_s"] == 180.0  # median of epochs 2 and 3; epoch 1 is warm-up
    assert summary["best_test_acc"] == 0.5 and summary["best_epoch"] == 2 and summary["final_test_acc"] == 0.45
    assert summary["time_to_best_s"] == 6.0 and summary["median_epoch_time_s"] == 2.25


def test_write_is_atomic_and_never_overwrites(tmp_path):
    path = results.write_results(record(), tmp_path)
    assert json.loads(path.read_text())["run_id"] == "r1"
    with pytest.raises(FileExistsError):
        results.write_results(record(model="vgg16"), tmp_path)
    assert json.loads(path.read_text())["model"] == "resnet18"
    assert [p.name for p in tmp_path.iterdir()] == ["r1.json"]  # no temp file left behind


def test_json_written_atomically_replaces_the_file_before(tmp_path):
    results.write_json_atomic(tmp_path / "finished.json", {"run_id": "first"})
    results.write_json_atomic(tmp_path / "finished.json", {"run_id": "second"})
    assert json.loads((tmp_path / "finished.json").read_text()) == {"run_id": "second"}


def test_failed_write_leaves_no_partial_file(tmp_path):
    with pytest.raises(ValueError):
        results.write_json_atomic(tmp_path / "x.json", {"bad": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_load_all_skips_malformed_and_foreign_files(tmp_path):
    results.write_results(record("good"), tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "foreign.json").write_text(json.dumps({"hello": "world"}))
    (tmp_path / "future.json").write_text(json.dumps(record("future", schema_version=99)))
    loaded, skipped = results.load_all(tmp_path)
    assert [r["run_id"] for r in loaded] == ["good"]
    assert len(skipped) == 3
    assert any("broken.json" in s for s in skipped) and any("missing fields" in s for s in skipped)
    assert any("schema_version 99" in s for s in skipped)


def test_check_writable_refuses_a_path_below_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="not writable"):
        results.check_writable(tmp_path / "file" / "sub")


def test_time_to_target_is_training_time_up_to_the_first_epoch_reaching_it():
    epochs = record()["epochs"]  # test_acc 0.3, 0.5, 0.45 after 4.0, 2.0, 2.5 s
    assert results.summarize_epochs(epochs, 0.5)["time_to_target_s"] == 6.0
    assert results.summarize_epochs(epochs, 0.3)["time_to_target_s"] == 4.0
    never = results.summarize_epochs(epochs, 0.9)
    assert never["target_acc"] == 0.9 and never["time_to_target_s"] is None
    assert results.summarize_epochs(epochs)["time_to_target_s"] is None


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan")])
def test_target_acc_outside_zero_to_one_is_refused(bad):
    with pytest.raises(UsageError, match="--target-acc"):
        TrainConfig(target_acc=bad).validate()


def test_load_all_counts_a_run_copied_twice_once(tmp_path):
    results.write_results(record("twice"), tmp_path)
    (tmp_path / "copy-of-twice.json").write_text((tmp_path / "twice.json").read_text())
    loaded, skipped = results.load_all(tmp_path)
    assert [r["run_id"] for r in loaded] == ["twice"]
    assert len(skipped) == 1 and "a copy of run twice" in skipped[0]


# Files may grow to 64 kB here; the writes below fail half-way through a 1 MB record, as on a full disk.
WRITE_TOO_MUCH = """
import json, resource, signal, sys
from pathlib import Path
from hpml import results

folder, big = Path(sys.argv[1]), {"run_id": "big", "blob": "x" * 2**20}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2**16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
failed = []
for write in (lambda: results.write_json_atomic(folder / "old.json", big), lambda: results.write_results(big, folder)):
    try:
        write()
    except OSError as error:
        failed.append(error.errno)
print(json.dumps(failed))
"""


def test_a_write_that_fails_half_way_leaves_no_partial_file(tmp_path):
    old = tmp_path / "old.json"
    results.write_json_atomic(old, record("old"))
    before = old.read_bytes()
    done = subprocess.run([sys.executable, "-c", WRITE_TOO_MUCH, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [errno.EFBIG, errno.EFBIG]  # both writes did fail
    assert old.read_bytes() == before  # the file overwritten is whole, as it was
    assert [p.name for p in tmp_path.iterdir()] == ["old.json"]  # no big.json, whole or partial; no temp file
