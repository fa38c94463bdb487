"""Checkpoints and resume: exact continuation after SIGKILL or SIGTERM, elastic restart, refusals.

The runs are as small as the point allows: shufflenetv2 (BatchNorm statistics and optimizer state, which a
resume must restore) on a 120-image npz set with 20 test images, in batches of 8, so an epoch has 15 steps, more
than train.CHECK_EVERY. Only the runs that are signalled run in a subprocess; the others call run_hpc.main in this
process.
"""

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

import run_hpc
from hpml import results
from hpml.config import CHECKPOINT_FILE, TrainConfig
from hpml.errors import UsageError, WriteFailed
from hpml.training import checkpoint, dist, loop
from hpml.training.dist import World, free_port
from tests.helpers import REPO, exit_code_of, record, results_in, write_npz

SMALL = ["--batch-size", "8", "--workers", "0"]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    """120 training images (15 steps of 8) and 20 test images, in the npz layout."""
    return write_npz(tmp_path_factory.mktemp("data") / "npz", train=120, test=20)


@pytest.fixture(scope="module")
def run_args(small_set) -> list[str]:
    return ["--model", "shufflenetv2", "--dataset", "cifar10", "--data-dir", str(small_set), *SMALL, "--epochs", "3",
            "--seed", "3"]


def start(*args: str, script: str = "run_hpc.py") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-u", script, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_line(process: subprocess.Popen, text: str, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = process.stdout.readline()
        if text in line:
            return line
        if not line and process.poll() is not None:
            pytest.fail(f"process ended before printing {text!r}: {process.stderr.read()}")
    pytest.fail(f"no {text!r} within {timeout}s")


def wait_for_checkpoint(folder: Path, timeout: float = 60) -> None:
    """The epoch's line is printed while its checkpoint is still being written in the background."""
    deadline = time.time() + timeout
    while not list(folder.glob("checkpoints/*/last.pt")):
        if time.time() > deadline:
            pytest.fail(f"no checkpoint under {folder} within {timeout}s")
        time.sleep(0.05)


def comparable(record: dict) -> list[dict]:
    return [{k: v for k, v in e.items() if "time" not in k and "per_s" not in k} for e in record["epochs"]]


def weights(output_dir) -> dict:
    (path,) = output_dir.glob("checkpoints/*/last.pt")
    return checkpoint.load(path)["trainer"]["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, run_args):
    """The reference: the same run without a stop; its record and final weights."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert exit_code_of(run_hpc.main, [*run_args, "--output-dir", str(out)]) == 0
    (record,) = results_in(out)
    return record, weights(out)


def interrupt_in_epoch_2(out, sig: int, run_args: list[str]) -> subprocess.Popen:
    """Signal the run as soon as epoch 1's checkpoint is on disk: epoch 2 has begun, and a SIGTERM is acted on at
    its 10th step (train.CHECK_EVERY) of 15 however fast the machine is; a sleep timed from epoch 1, which includes
    the warm-up, can overshoot into epoch 3."""
    process = start(*run_args, "--output-dir", str(out))
    wait_for_line(process, "epoch 1/3")
    wait_for_checkpoint(out)
    process.send_signal(sig)
    process.wait(timeout=120)
    return process


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_resume_after_a_kill_in_epoch_2_is_bit_identical(sig, uninterrupted, run_args, tmp_path, capsys):
    started = time.time()
    stopped = interrupt_in_epoch_2(tmp_path, sig, run_args)
    if sig == signal.SIGTERM:
        err = stopped.stderr.read()
        assert stopped.returncode == 130
        assert "stopped by a signal at step" in err and "of epoch 2" in err and "--resume" in err
        assert len(err.strip().splitlines()) == 1
    else:
        assert stopped.returncode == -signal.SIGKILL
    assert not results_in(tmp_path)
    assert exit_code_of(run_hpc.main, [*run_args, "--output-dir", str(tmp_path), "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out
    (record,) = results_in(tmp_path)
    expected_record, expected_weights = uninterrupted
    assert record["resumes"] == 1 and len(record["epochs"]) == 3
    assert comparable(record) == comparable(expected_record)
    resumed_weights = weights(tmp_path)
    assert all(torch.equal(resumed_weights[name], expected_weights[name]) for name in expected_weights)
    print(f"{signal.Signals(sig).name}: kill and resume took {time.time() - started:.1f}s")


def run_in_process(capsys, *argv: str) -> tuple[int, str, str]:
    """run_hpc.main(argv) in this process; (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = exit_code_of(run_hpc.main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_resume_refuses_other_settings_and_skips_finished_runs(run_args, tmp_path, capsys):
    one_epoch = [*run_args, "--output-dir", str(tmp_path), "--epochs", "1"]
    assert run_in_process(capsys, *one_epoch, "--quiet")[0] == 0
    code, out, _ = run_in_process(capsys, *one_epoch, "--resume")
    assert code == 0 and "already finished" in out
    assert len(results_in(tmp_path)) == 1
    code, _, err = run_in_process(capsys, *one_epoch, "--batch-size", "16", "--resume")
    assert code == 2
    assert "was made with batch_size 8, this run has 16" in err
    assert len(err.strip().splitlines()) == 1


def test_a_fresh_run_that_fails_leaves_the_finished_run_in_its_folder_alone(run_args, tmp_path, capsys):
    one_epoch = [*run_args, "--output-dir", str(tmp_path), "--epochs", "1", "--quiet"]
    assert run_in_process(capsys, *one_epoch)[0] == 0
    folder = tmp_path / "checkpoints" / "shufflenetv2_single_w1"
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    code, _, err = run_in_process(capsys, *one_epoch, "--optimizer", "sgd", "--lr", "1e15")
    assert code == 3 and "NaN or infinite in epoch 1" in err
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before
    code, out, _ = run_in_process(capsys, *one_epoch[:-1], "--resume")
    assert code == 0 and "already finished" in out


def test_truncated_checkpoint_is_named_and_not_used(run_args, tmp_path, capsys):
    path = tmp_path / "checkpoints" / "shufflenetv2_single_w1" / "last.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 truncated")
    code, _, err = run_in_process(capsys, *run_args, "--output-dir", str(tmp_path), "--resume")
    assert code == 2
    assert f"checkpoint {path} is corrupt or truncated" in err
    assert "Traceback" not in err and not results_in(tmp_path)


def test_diverging_loss_stops_with_a_clear_message(tmp_path, capsys):
    code, _, err = run_in_process(capsys, "--model", "shufflenetv2", "--dataset", "synthetic", "--subset", "80", *SMALL,
                                  "--epochs", "2", "--optimizer", "sgd", "--lr", "1e15", "--output-dir", str(tmp_path))
    assert code == 3
    assert "the training loss became NaN or infinite in epoch 1" in err
    assert len(err.strip().splitlines()) == 1 and not results_in(tmp_path)


@pytest.mark.slow  # five processes; the kill, resume and torchrun's handling of a lost rank are tested above and in
# test_distributed.py, this adds torchrun's restart of the group
def test_elastic_restart_resumes_and_completes(small_set, tmp_path):
    # Restarts need torchrun's c10d rendezvous; the static one (--master_port) cannot re-form the group.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "run_distributed.py",
               "--model", "shufflenetv2", "--dataset", "cifar10", "--data-dir", str(small_set), "--batch-size", "4",
               "--epochs", "3", "--workers", "0", "--output-dir", str(tmp_path)]
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_line(launcher, "epoch 1/3")
        wait_for_checkpoint(tmp_path)
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                   if "run_distributed.py" in " ".join(p.cmdline())]
        workers[-1].send_signal(signal.SIGKILL)
        output, _ = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output
    assert "resuming from" in output
    (record,) = results_in(tmp_path)
    assert record["resumes"] == 1 and [e["epoch"] for e in record["epochs"]] == [1, 2, 3]
    assert record["world_size"] == 2


def test_a_finished_mark_keeps_the_results_files_and_is_cleared_for_a_fresh_start(tmp_path):
    path = tmp_path / "resnet18_single_w1" / CHECKPOINT_FILE
    written = tmp_path / "results" / "run.json"
    written.parent.mkdir()
    written.write_text("{}")
    assert checkpoint.finished_run(path) is None
    checkpoint.mark_finished(path, "run", [written])
    assert checkpoint.finished_run(path) == {"run_id": "run", "results_file": str(written), "files": ["run.json"]}
    assert path.with_name(checkpoint.RESULTS_COPIES).joinpath("run.json").read_text() == "{}"
    checkpoint.clear_finished(path)
    assert checkpoint.finished_run(path) is None
    assert not path.with_name(checkpoint.RESULTS_COPIES).exists()
    path.with_name(checkpoint.FINISHED_FILE).write_text("{not json")
    assert checkpoint.finished_run(path) is None


def test_the_background_writer_saves_the_state_as_it_was_when_asked(tmp_path):
    path = tmp_path / "run" / CHECKPOINT_FILE
    weights = torch.zeros(1000)
    with checkpoint.BackgroundWriter() as writer:
        writer.write(path, {"identity": {}, "weights": weights})
        weights += 1  # training goes on while the file is written
        writer.write(path, {"identity": {}, "weights": weights})  # waits for the first write
        weights += 1
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.ones(1000))
    assert [p.name for p in path.parent.iterdir()] == [CHECKPOINT_FILE]  # no temp file left


def test_a_failed_background_write_is_reported_with_the_path(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    path = tmp_path / "a-file" / "run" / CHECKPOINT_FILE
    writer = checkpoint.BackgroundWriter()
    writer.write(path, {"identity": {}})
    with pytest.raises(WriteFailed, match=f"cannot write checkpoint {path}"):
        writer.wait()
    writer.wait()  # reported once


def test_a_checkpoint_from_before_drop_last_counts_as_keeping_the_partial_batch(tmp_path):
    older = {"identity": {"batch_size": 32}}
    checkpoint.check_identity(older, {"batch_size": 32, "drop_last": False}, tmp_path / "last.pt")
    with pytest.raises(UsageError, match="made with drop_last False, this run has True"):
        checkpoint.check_identity(older, {"batch_size": 32, "drop_last": True}, tmp_path / "last.pt")


# Every setting a checkpoint must have been made with to be continued, and another value for it: listed here, not
# read from checkpoint.IDENTITY_FIELDS, so that a setting dropped from there fails its case.
IDENTITY_CHANGES = {"batch_size": 16, "lr": 0.5, "optimizer": "sgd", "schedule": "cosine", "epochs": 5, "seed": 7,
                    "dataset": "synthetic", "subset": 100, "scale_lr": True, "drop_last": False}
ALONE = World(rank=0, local_rank=0, size=1, nodes=1, backend=None, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def saved_config(tmp_path_factory) -> TrainConfig:
    """A config whose checkpoint (of resnet18, in a world of one) lies in its --checkpoint-dir."""
    cfg = TrainConfig(checkpoint_dir=str(tmp_path_factory.mktemp("identity")), epochs=3, batch_size=8)
    with checkpoint.RunCheckpoint(cfg, "resnet18", ALONE, resume=False) as saved:
        saved.save(loop.RunLog.new("resnet18", ALONE).as_dict(), lambda: {"model": {}})  # only the identity is read
    return cfg


@pytest.mark.parametrize("name, value", IDENTITY_CHANGES.items(), ids=list(IDENTITY_CHANGES))
def test_resume_refuses_a_checkpoint_made_with_any_other_identity_setting(name, value, saved_config):
    assert getattr(saved_config, name) != value
    with pytest.raises(UsageError, match=f"was made with {name} .*, this run has {value!r}"):
        checkpoint.RunCheckpoint(dataclasses.replace(saved_config, **{name: value}), "resnet18", ALONE, resume=True)


def test_resume_continues_a_checkpoint_made_with_other_speed_settings(saved_config):
    faster = dataclasses.replace(saved_config, workers=0, loader="torch", precision="fp32", compile=True)
    assert checkpoint.RunCheckpoint(faster, "resnet18", ALONE, resume=True).run is not None


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()}


@pytest.fixture
def job_folders(tmp_path, monkeypatch) -> tuple[TrainConfig, Path]:
    """A finished resnet18 checkpoint (no trainer state but its model's) in ckpt/, output to out/, and a SageMaker
    model folder: a resume that follows the names in finished.json writes wherever they lead."""
    monkeypatch.setenv("SM_MODEL_DIR", str(tmp_path / "model"))
    cfg = TrainConfig(checkpoint_dir=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "out"), epochs=3, batch_size=8)
    with checkpoint.RunCheckpoint(cfg, "resnet18", ALONE, resume=False) as saved:
        saved.save(loop.RunLog.new("resnet18", ALONE).as_dict(), lambda: {"model": {"w": torch.zeros(1)}})
    kept = saved.path.with_name(checkpoint.RESULTS_COPIES)
    kept.mkdir()
    (kept.parent / "escape").write_text("kept beside the checkpoint")  # what results/../escape names
    return cfg, saved.path


@pytest.mark.parametrize("finished", [{"run_id": "../x", "files": []}, {"run_id": "r", "files": ["../escape"]}],
                         ids=["run_id", "files"])
def test_names_in_finished_json_that_lead_out_of_their_folder_are_refused(finished, job_folders, tmp_path):
    cfg, path = job_folders
    path.with_name(checkpoint.FINISHED_FILE).write_text(json.dumps({**finished, "results_file": "r.json"}))
    before = files_under(tmp_path)
    saved = checkpoint.RunCheckpoint(cfg, "resnet18", ALONE, resume=True)
    with pytest.raises(UsageError, match="is not a plain name inside") as refused:
        saved.restore_finished(Path(cfg.output_dir), log=lambda _: None)
    assert "\n" not in str(refused.value)
    assert files_under(tmp_path) == before  # nothing written, in the output folder or outside it


def test_a_checkpoint_whose_run_id_leads_out_of_the_output_folder_is_refused(job_folders, tmp_path):
    cfg, path = job_folders
    state = checkpoint.load(path)
    state["run"]["run_id"] = "../x"
    torch.save(state, path)
    with pytest.raises(UsageError, match=r"run id '\.\./x' is not a plain name inside"):
        checkpoint.RunCheckpoint(cfg, "resnet18", ALONE, resume=True)


def one_epoch(out: Path, **changes: object) -> TrainConfig:
    """One epoch of shufflenetv2 on 40 synthetic images: a finished run in seconds."""
    return TrainConfig(models=["shufflenetv2"], dataset="synthetic", subset=40, batch_size=10, epochs=1, workers=0,
                       device="cpu", output_dir=str(out), quiet=True, **changes).validate()


@pytest.fixture(scope="module")
def finished_output(tmp_path_factory) -> Path:
    """The output folder of a finished run, its checkpoint (marked finished) in checkpoints/."""
    out = tmp_path_factory.mktemp("finished")
    loop.run_models(one_epoch(out), dist.single_process("cpu"), log=lambda _: None)
    return out


def unmark(out: Path) -> None:
    """A kill between the results file and the finished mark: no mark, no copies beside the checkpoint."""
    folder = out / "checkpoints" / "shufflenetv2_single_w1"
    folder.joinpath(checkpoint.FINISHED_FILE).unlink()
    shutil.rmtree(folder / checkpoint.RESULTS_COPIES)


def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "results, no finished mark": lambda out, results_file: unmark(out),
    "cut finished.json": lambda out, results_file: cut(out / "checkpoints/shufflenetv2_single_w1/finished.json"),
    "cut results, finished mark": lambda out, results_file: cut(results_file),
    "cut results, no finished mark": lambda out, results_file: (cut(results_file), unmark(out)),
}


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=list(DAMAGES))
def test_resuming_a_finished_run_whose_files_are_cut_short_ends_as_finished(damage, finished_output, tmp_path):
    out = shutil.copytree(finished_output, tmp_path / "out")
    (results_file,) = out.glob("*.json")
    whole = json.loads(results_file.read_text())
    damage(out, results_file)
    for _ in range(2):  # and every later --resume the same
        lines = []
        loop.run_models(one_epoch(out, resume=True), dist.single_process("cpu"), log=lines.append)
        assert any("already finished" in line for line in lines), lines
    restored = results.load_results(results_file)
    assert restored["run_id"] == whole["run_id"] and restored["epochs"] == whole["epochs"]
    checkpoint_path = out / "checkpoints" / "shufflenetv2_single_w1" / CHECKPOINT_FILE
    assert checkpoint.finished_run(checkpoint_path)["run_id"] == whole["run_id"]
    kept = checkpoint_path.with_name(checkpoint.RESULTS_COPIES) / results_file.name
    assert results.load_results(kept)["run_id"] == whole["run_id"]


def test_a_resume_that_trains_beside_the_first_attempt_keeps_its_results(finished_output, tmp_path):
    """The first attempt writes its results while a --resume started meanwhile trains: the second one ends as
    finished, leaving the first one's file as it was."""
    out = shutil.copytree(finished_output, tmp_path / "out")
    (results_file,) = out.glob("*.json")
    first = results_file.read_bytes()
    unmark(out)
    results_file.rename(tmp_path / "aside.json")

    def first_attempt_finishes(line: str) -> None:
        lines.append(line)
        if "resuming from" in line:
            (tmp_path / "aside.json").rename(results_file)

    lines = []
    loop.run_models(one_epoch(out, resume=True), dist.single_process("cpu"), log=first_attempt_finishes)
    assert results_file.read_bytes() == first
    assert any("already finished" in line for line in lines), lines
    assert checkpoint.finished_run(out / "checkpoints" / "shufflenetv2_single_w1" / CHECKPOINT_FILE)


def test_another_runs_record_is_never_taken_for_this_runs_results(tmp_path):
    path = results.write_results(record("other"), tmp_path)
    with pytest.raises(UsageError, match=f"{path} holds no results of run mine"):
        checkpoint.own_record(path, "mine")
    assert checkpoint.own_record(path, "other")["run_id"] == "other"
    cut(path)
    assert checkpoint.own_record(path, "other") is None


# Files may grow to 64 kB here: the checkpoint of 256 kB below fails half-way, as on a full disk.
SAVE_TOO_MUCH = """
import resource, signal, sys
from pathlib import Path
import torch
from hpml.training import checkpoint

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2**16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
writer = checkpoint.BackgroundWriter()
writer.write(Path(sys.argv[1]), {"identity": {}, "weights": torch.zeros(2**16)})
try:
    writer.wait()
except Exception as error:
    print(f"{type(error).__name__}: {error}")
"""


def test_a_checkpoint_that_does_not_fit_on_the_disk_is_one_line_and_the_last_one_stays(tmp_path):
    path = tmp_path / "run" / CHECKPOINT_FILE
    with checkpoint.BackgroundWriter() as writer:
        writer.write(path, {"identity": {}, "weights": torch.ones(10)})
    done = subprocess.run([sys.executable, "-c", SAVE_TOO_MUCH, str(path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"WriteFailed: cannot write checkpoint {path}: File too large"
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.ones(10))
    assert [p.name for p in path.parent.iterdir()] == [CHECKPOINT_FILE]  # no temp file left
