import errno
import json
import subprocess
import sys

import pytest

from hpml import results
from hpml.config import TrainConfig
from hpml.errors import UsageError
from tests.helpers import REPO, gpu_record, record


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
    assert any("schema_version must be 1, found 99" in s for s in skipped)


def test_every_results_record_of_the_repository_and_the_tests_is_valid():
    paths = [*(REPO / "results_img" / "runs").glob("*.json"), *(REPO / "bench" / "measured").rglob("*.json")]
    runs = [run for run in map(json.loads, (path.read_text() for path in paths)) if "schema_version" in run]
    assert len(runs) >= 20
    for run in [*runs, record(), gpu_record("g", "NVIDIA H100", 2)]:
        assert results.validate_record(run) is run


@pytest.mark.parametrize("field, value, found", [
    ("final_test_acc", "0.5", 'final_test_acc must be a number from 0 to 1, found "0.5"'),
    ("final_test_acc", float("nan"), "final_test_acc must be a number from 0 to 1, found NaN"),
    ("world_size", "two", 'world_size must be a whole number from 1 to 10^15, found "two"'),
    ("world_size", True, "world_size must be a whole number from 1 to 10^15, found true"),  # a bool is no number
    ("config", None, "config must be a JSON object, found null"),
    ("sagemaker", [1], "sagemaker must be a JSON object or null, found [1]"),
    ("run_id", "../up", "run_id must be a file name"),
])
def test_a_record_holding_a_bad_value_is_skipped_naming_the_file_and_the_field(field, value, found, tmp_path):
    results.write_results(record("good"), tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({**record("bad"), field: value}))
    loaded, skipped = results.load_all(tmp_path)
    assert [run["run_id"] for run in loaded] == ["good"]
    (message,) = skipped
    assert message.startswith(f"{tmp_path / 'bad.json'}: {found}"), message


def test_check_output_folder_refuses_a_path_below_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="not writable"):
        results.check_output_folder(tmp_path / "file" / "sub")


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
        failed.append([error.errno, Path(error.filename).name])
print(json.dumps(failed))
"""


def test_a_write_that_fails_half_way_leaves_no_partial_file(tmp_path):
    old = tmp_path / "old.json"
    results.write_json_atomic(old, record("old"))
    before = old.read_bytes()
    done = subprocess.run([sys.executable, "-c", WRITE_TOO_MUCH, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [[errno.EFBIG, "old.json"], [errno.EFBIG, "big.json"]]  # failed, named
    assert old.read_bytes() == before  # the file overwritten is whole, as it was
    assert [p.name for p in tmp_path.iterdir()] == ["old.json"]  # no big.json, whole or partial; no temp file
