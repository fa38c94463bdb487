"""The training loop's stops: a signal honoured at any step, a stop at an epoch's last step resumed, results
written again after a SageMaker spot restart, write errors in one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run_hpc
from hpml import data, monitor
from hpml.config import TrainConfig
from hpml.errors import RunStopped
from hpml.training import checkpoint, dist, loop
from tests.helpers import REPO, exit_code_of, refusal, results_in, write_npz

STEPS_PER_EPOCH = 4  # 40 images at batch 10: fewer steps than loop.CHECK_EVERY


def config(out: Path, **changes: object) -> TrainConfig:
    return TrainConfig(models=["shufflenetv2"], dataset="synthetic", subset=40, batch_size=10, epochs=2, workers=0,
                       device="cpu", output_dir=str(out), quiet=True, **changes).validate()


def stop_after(calls: int):
    """A stop flag that goes up at its `calls`-th read (the loop reads it once per step in a world of one)."""
    reads = []

    def stop_requested() -> bool:
        reads.append(1)
        return len(reads) >= calls

    return stop_requested


def comparable(record: dict) -> list[dict]:
    return [{k: v for k, v in e.items() if "time" not in k and "per_s" not in k} for e in record["epochs"]]


@pytest.fixture(scope="module")
def images() -> data.ImageSet:
    return data.synthetic_cifar10(40, 20)


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory) -> dict:
    cfg = config(tmp_path_factory.mktemp("uninterrupted"))
    return loop.fit(cfg, "shufflenetv2", dist.single_process("cpu"), images, log=lambda _: None)


@pytest.mark.filterwarnings("error::UserWarning")  # the resumed epoch takes no step: the scheduler must not warn
def test_a_stop_at_an_epochs_last_step_resumes_to_the_same_run(images, uninterrupted, tmp_path):
    world = dist.single_process("cpu")
    with pytest.raises(RunStopped, match=f"at step {STEPS_PER_EPOCH} of epoch 1"):
        loop.fit(config(tmp_path), "shufflenetv2", world, images, lambda _: None, stop_after(STEPS_PER_EPOCH))
    record = loop.fit(config(tmp_path, resume=True), "shufflenetv2", world, images, lambda _: None)
    assert record["resumes"] == 1
    assert comparable(record) == comparable(uninterrupted)


def test_a_world_of_one_stops_at_the_next_step_even_in_short_epochs(images, tmp_path):
    with pytest.raises(RunStopped, match="at step 2 of epoch 1"):
        loop.fit(config(tmp_path), "shufflenetv2", dist.single_process("cpu"), images, lambda _: None,
                  stop_after(2))


def test_a_process_group_stops_after_the_epoch_when_no_check_falls_inside_it(images, tmp_path, monkeypatch):
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "SM_TRAINING_ENV", "SM_HOSTS"):
        monkeypatch.delenv(name, raising=False)
    world = dist.setup(config(tmp_path), log=lambda _: None)  # a gloo group of one: ranks must agree
    try:
        with pytest.raises(RunStopped, match="after epoch 1"):
            loop.fit(config(tmp_path), "shufflenetv2", world, images, lambda _: None, stop_after(1))
    finally:
        dist.teardown()
    (path,) = tmp_path.glob("checkpoints/*/last.pt")
    saved = checkpoint.load(path)["run"]
    assert len(saved["epochs"]) == 1 and saved["partial"] is None


def test_a_spot_restart_writes_every_finished_models_results_again(tmp_path, monkeypatch):
    """SageMaker restores checkpoints/ on a restart; output/ and model/ start empty."""
    base = tmp_path / "opt-ml"
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(base))
    monkeypatch.setenv("SM_TRAINING_ENV", "{}")
    monkeypatch.setenv("SM_OUTPUT_DATA_DIR", str(base / "output" / "data"))
    monkeypatch.setenv("SM_MODEL_DIR", str(base / "model"))
    folder = write_npz(tmp_path / "data", train=20, test=10)
    argv = ["--model", "shufflenet,mobilenet", "--data-dir", str(folder), "--batch-size", "10",
            "--epochs", "1", "--workers", "0", "--device", "cpu", "--utilization", "--sample-interval", "0.2",
            "--quiet"]
    assert exit_code_of(run_hpc.main, argv) == 0
    results = base / "output" / "data" / "results"
    first = {path.name: path.read_bytes() for path in results.iterdir()}
    weights = {path.name: torch.load(path, weights_only=True) for path in (base / "model").iterdir()}
    assert len(results_in(results)) == 2 and len(first) == 4 and len(weights) == 2  # a JSON and a CSV per model
    assert all(path.parent.name.endswith("_single_w1") for path in (base / "checkpoints").glob("*/last.pt"))
    for folder in ("output", "model"):
        for path in sorted((base / folder).rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()

    assert exit_code_of(run_hpc.main, argv) == 0
    assert {path.name: path.read_bytes() for path in results.iterdir()} == first
    restored = {path.name: torch.load(path, weights_only=True) for path in (base / "model").iterdir()}
    assert restored.keys() == weights.keys()
    for name, state in weights.items():
        assert all(torch.equal(state[key], restored[name][key]) for key in state)


def test_sampling_that_fails_during_training_costs_the_samples_not_the_results(tmp_path, monkeypatch, capsys):
    def sensor_gone():
        raise RuntimeError("sensor gone")

    monkeypatch.setattr(monitor.psutil, "virtual_memory", sensor_gone)
    folder = write_npz(tmp_path / "data", train=20, test=10)
    argv = ["--model", "shufflenet", "--data-dir", str(folder), "--batch-size", "10", "--epochs", "1", "--workers",
            "0", "--device", "cpu", "--utilization", "--sample-interval", "0.05", "--output-dir", str(tmp_path / "out")]
    assert exit_code_of(run_hpc.main, argv) == 0
    (record,) = results_in(tmp_path / "out")
    assert record["utilization"]["samples"] == 0
    assert "utilization sampling stopped early on rank 0 (RuntimeError: sensor gone)" in capsys.readouterr().out


ONE_EPOCH = ["--model", "shufflenet", "--dataset", "synthetic", "--subset", "40", "--batch-size", "10", "--epochs", "1",
             "--workers", "0", "--device", "cpu", "--quiet"]


def deep_folder(base: Path, length: int) -> Path:
    """A folder under `base` whose path is `length` characters long (or one less)."""
    folder = base
    while length - len(str(folder)) > 1:
        folder /= "d" * min(100, length - len(str(folder)) - 1)
    folder.mkdir(parents=True)
    return folder


@pytest.mark.parametrize("flag", ["--output-dir", "--checkpoint-dir"])
def test_a_file_path_longer_than_the_system_allows_is_refused_before_training(flag, tmp_path, capsys):
    deep = deep_folder(tmp_path, os.pathconf(tmp_path, "PC_PATH_MAX") - 40)  # writable; its run's files are not
    folders = {"--output-dir": tmp_path / "out", "--checkpoint-dir": tmp_path / "ckpt", flag: deep}
    argv = [*ONE_EPOCH, *(item for pair in folders.items() for item in map(str, pair))]
    err = refusal(run_hpc.main, argv, capsys)
    assert "cannot be written: its path is longer than the file system allows" in err
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]  # no checkpoint: it did not train


# Runs run_hpc.py in a mount namespace of its own, where the output folder turns read-only once training is done.
READ_ONLY_AFTER_TRAINING = """
import subprocess, sys
import run_hpc
from hpml import cli
from hpml.training import loop

out, fit = sys.argv[1], loop.fit
subprocess.run(["mount", "--bind", out, out], check=True)


def fit_then_read_only(*args, **kwargs):
    record = fit(*args, **kwargs)
    subprocess.run(["mount", "-o", "remount,bind,ro", out], check=True)
    return record


loop.fit = fit_then_read_only
cli.run_script(run_hpc.main, sys.argv[2:])
"""
OWN_MOUNTS = ["unshare", "--mount", "--map-root-user"]


def own_mounts_allowed() -> bool:
    try:
        return subprocess.run([*OWN_MOUNTS, "true"], capture_output=True, timeout=30).returncode == 0
    except OSError:
        return False


@pytest.mark.skipif(not own_mounts_allowed(), reason="needs unshare: a mount namespace to make a folder read-only")
def test_an_output_folder_that_turns_read_only_during_training_costs_one_line_and_keeps_the_checkpoint(tmp_path,
                                                                                                       capsys):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    argv = [*ONE_EPOCH, "--output-dir", str(out), "--checkpoint-dir", str(ckpt)]
    done = subprocess.run([*OWN_MOUNTS, sys.executable, "-c", READ_ONLY_AFTER_TRAINING, str(out), *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    err = done.stderr.strip()
    assert done.returncode == 1 and len(err.splitlines()) == 1, err
    assert f"cannot write {out}/shufflenetv2_single_w1_" in err and ".json: Read-only file system" in err
    assert "rerun with --resume" in err and not list(out.iterdir())
    assert exit_code_of(run_hpc.main, [*argv, "--resume"]) == 0  # the checkpoint stayed: the results follow
    assert "after epoch 1" in capsys.readouterr().out and len(results_in(out)) == 1
