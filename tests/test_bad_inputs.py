"""The bad-input sweep: every script, each bad flag, data file, checkpoint or path gives one clear line.

Each case runs a script's main in this process, as its __main__ does, in a folder that already holds a results
file, and checks: exit code 2, exactly one line on stderr naming the problem (a warning counts as a line), no
traceback, and the results untouched. A few cases run the script in a subprocess instead, as a user would: one
case each for run_distributed.py, a data file numpy cannot read and a bench/ script, which sets up its own import
path.
"""

import argparse
import dataclasses
import errno
import hashlib
import io
import json
import os
import signal
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hpml import cli, data, monitor, results
from hpml.config import MAX_EPOCHS, TrainConfig
from hpml.errors import Terminated, UsageError
from hpml.study import matrix, plots
from hpml.training import checkpoint, dist
from tests.helpers import REPO, exit_code_of, record, run_script, script_main, signalled_when

SMALL_RUN = {"--dataset": "synthetic", "--subset": "20", "--batch-size": "10", "--epochs": "1", "--workers": "0"}


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """A results folder with an existing run, bad data folders, a blocked path and bad checkpoints."""
    root = tmp_path_factory.mktemp("bad")
    results.write_results(record("existing-run"), root / "results")
    (root / "a-file").write_text("not a folder")
    rng = np.random.default_rng(0)
    for name in ("corrupt", "shape", "tiny", "huge-labels", "huge-claim", "fifo"):
        (root / name).mkdir()
        for split in ("train", "test"):
            np.savez(root / name / f"{split}.npz", images=rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8),
                     labels=np.arange(30) % 10)
    (root / "corrupt" / "train.npz").write_bytes(b"PK\x03\x04 cut short")
    for name, split, images, labels in [
        ("float-labels", "train", rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8), np.arange(30) % 10 + 0.5),
        ("empty-test", "test", np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64)),
        ("label-shape", "train", rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8), np.zeros((30, 2), np.int64)),
        ("bool-labels", "test", rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8), np.ones(30, bool)),
    ]:
        (root / name).mkdir()
        np.savez(root / name / "train.npz", images=rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8),
                 labels=np.arange(30) % 10)
        np.savez(root / name / "test.npz", images=rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8),
                 labels=np.arange(30) % 10)
        np.savez(root / name / f"{split}.npz", images=images, labels=labels)
    np.savez(root / "shape" / "test.npz", images=np.zeros((4, 28, 28), np.uint8), labels=np.zeros(4, np.uint8))
    np.savez(root / "huge-labels" / "train.npz", images=np.zeros((4, 32, 32, 3), np.uint8),
             labels=np.full(4, 2**63, np.uint64))  # cast to int64, 2**63 would wrap to a negative label
    with zipfile.ZipFile(root / "huge-claim" / "train.npz", "w") as npz:  # a header claiming 10^14 images
        for name, array in (("images", np.zeros((4, 32, 32, 3), np.uint8)), ("labels", np.zeros(4, np.uint8))):
            saved = io.BytesIO()
            np.save(saved, array)
            npz.writestr(f"{name}.npy", saved.getvalue().replace(b"(4, 32, 32, 3)", b"(99999999999999, 32, 32, 3)"))
    (root / "fifo" / "train.npz").unlink()
    os.mkfifo(root / "fifo" / "train.npz")  # opened as a plain file, it waits for a writer for ever
    truncated = root / "truncated" / "resnet18_single_w1" / "last.pt"
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes(b"PK\x03\x04")
    other = root / "other" / "resnet18_single_w1" / "last.pt"
    identity = {"model": "resnet18", "world_size": 1, "batch_size": 64, "lr": 0.1, "optimizer": "adadelta",
                "schedule": "none", "epochs": 1, "seed": 0, "dataset": "synthetic", "subset": 20, "scale_lr": False}
    misfit = root / "misfit" / "resnet18_single_w1" / "last.pt"
    progress = {"run_id": "resnet18_single_w1_x", "started_at": "", "epochs": [], "partial": None, "resumes": 0,
                "wall_time_s": 0.0, "setup_time_s": 0.0, "checkpoint_time_s": 0.0}
    fitting = {**identity, "batch_size": 10, "drop_last": True}
    with checkpoint.BackgroundWriter() as writer:
        writer.write(other, {"identity": identity, "run": {}, "trainer": {"model": {"w": torch.zeros(1)}}})
        writer.write(misfit, {"identity": fitting, "run": progress, "trainer": {"model": {"w": torch.zeros(1)}}})
        for name, run, trainer in (("no-progress", {}, {"model": {}}), ("no-weights", progress, [])):
            writer.write(root / name / "resnet18_single_w1" / "last.pt", {"identity": fitting, "run": run,
                                                                          "trainer": trainer})
    (root / "linked" / "resnet18_single_w1").mkdir(parents=True)  # a copied checkpoint folder holding a link out
    (root / "linked" / "resnet18_single_w1" / "results").symlink_to(root / "tiny")
    (root / "fifo" / "resnet18_single_w1").mkdir()
    os.mkfifo(root / "fifo" / "resnet18_single_w1" / "last.pt")
    return root


def snapshot(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# (script, arguments with {root} for the fixture folder, text the one line must contain)
CASES = [
    ("run_hpc.py", ["--model", "alexnet"], "unknown model 'alexnet'"),
    ("run_hpc.py", ["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    ("run_hpc.py", ["--batch-size", "-1"], "--batch-size must be a positive integer, got -1"),
    ("run_hpc.py", ["--lr", "-0.1"], "--lr must be a positive number, got -0.1"),
    ("run_hpc.py", ["--optimizer", "rmsprop"], "argument --optimizer: invalid choice: 'rmsprop'"),
    ("run_hpc.py", ["--workers", "-2"], "--workers must be 0 or more, got -2"),
    ("run_hpc.py", ["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    ("run_hpc.py", ["--loader", "gpu"], "argument --loader: invalid choice: 'gpu'"),
    ("run_hpc.py", ["--quiet", "maybe"], "expected true or false, got 'maybe'"),
    ("run_hpc.py", ["--seed", "-3"], "--seed must be 0 or more, got -3"),
    ("run_hpc.py", ["--device", "cuda"], "--device cuda: no CUDA device is available here"),
    ("run_hpc.py", ["--batch-size", "64"], "--batch-size 64 is larger than the 20 training images each process gets"),
    ("run_hpc.py", ["--device", "cpu", "--cuda-graphs"], "--cuda-graphs needs a CUDA device, got cpu"),
    ("run_hpc.py", ["--dataset", "cifar10", "--data-dir", "{root}/tiny", "--subset", "500"],
     "--subset 500 is larger than the training set (30 images)"),
    ("run_hpc.py", ["--dataset", "cifar10", "--data-dir", "{root}/corrupt"], "cannot read {root}/corrupt/train.npz"),
    ("run_hpc.py", ["--dataset", "cifar10", "--data-dir", "{root}/shape"], "images must be uint8 (N, 32, 32, 3)"),
    ("run_hpc.py", ["--dataset", "cifar10", "--data-dir", "{root}/float-labels"],
     "float-labels/train.npz: labels must be integers 0..9 of shape (N,), got float64 (30,)"),
    ("run_hpc.py", ["--dataset", "cifar10", "--data-dir", "{root}/empty-test"],
     "empty-test/test.npz: holds no images"),
    ("run_hpc.py", ["--dataset", "cifar10", "--data-dir", "{root}/label-shape"], "got int64 (30, 2)"),
    ("run_hpc.py", ["--dataset", "cifar10", "--data-dir", "{root}/bool-labels"], "got bool (30,)"),
    ("run_hpc.py", ["--subset", "1000000000000000"], "--subset must be at most 50000, got 1000000000000000"),
    ("run_hpc.py", ["--epochs", "100000000"], "--epochs must be at most 10000, got 100000000"),
    ("run_hpc.py", ["--batch-size", "99999999"], "--batch-size must be at most 50000"),
    ("run_hpc.py", ["--workers", "100000"], "--workers must be at most 256, got 100000"),
    ("run_hpc.py", ["--seed", "18446744073709551616"], "--seed must be at most 4294967295"),
    ("run_hpc.py", ["--utilization", "--sample-interval", "1e300"], "--sample-interval must be at most 3600"),
    ("run_hpc.py", ["--utilization", "--sample-interval", "1e-6"], "--sample-interval must be at least 0.01 seconds"),
    ("run_hpc.py", ["--output-dir", "{root}/a-file/results"], "output folder {root}/a-file/results is not writable"),
    ("run_hpc.py", ["--checkpoint-dir", "{root}/a-file/ckpt"], "checkpoint folder {root}/a-file/ckpt is not writable"),
    ("run_hpc.py", ["--checkpoint-dir", "{root}/truncated", "--resume"],
     "checkpoint {root}/truncated/resnet18_single_w1/last.pt is corrupt or truncated"),
    ("run_hpc.py", ["--checkpoint-dir", "{root}/other", "--resume"], "was made with batch_size 64, this run has 10"),
    ("run_hpc.py", ["--checkpoint-dir", "{root}/misfit", "--resume"],
     "checkpoint {root}/misfit/resnet18_single_w1/last.pt does not fit resnet18 (Error(s) in loading state_dict"),
    ("run_hpc.py", ["--checkpoint-dir", "{root}/no-progress", "--resume"],
     "checkpoint {root}/no-progress/resnet18_single_w1/last.pt is not an hpml checkpoint of format 1 (its run.run_id "
     "is missing or malformed)"),
    ("run_hpc.py", ["--checkpoint-dir", "{root}/no-weights", "--resume"], "(its trainer is missing or malformed)"),
    ("run_hpc.py", ["--checkpoint-dir", "{root}/linked"],
     "folder 'resnet18_single_w1/results' leads outside {root}/linked (through a link)"),
    ("run_hpc.py", ["--checkpoint-dir", "{root}/fifo", "--resume"],
     "checkpoint {root}/fifo/resnet18_single_w1/last.pt is corrupt or truncated ([Errno 22] not a regular file"),
    ("run_hpc.py", ["--dataset", "cifar10", "--data-dir", "{root}/fifo"],
     "cannot read {root}/fifo/train.npz: [Errno 22] not a regular file (a FIFO, a socket or a device)"),
    ("run_hpc.py", ["--dataset", "cifar10", "--data-dir", "{root}/huge-claim"],
     "cannot read {root}/huge-claim/train.npz: Unable to allocate"),
    ("run_hpc.py", ["--dataset", "cifar10", "--data-dir", "{root}/huge-labels"],
     "labels must lie in 0..9, got 9223372036854775808..9223372036854775808"),
    ("run_hpc.py", ["--output-dir", ""], "argument --output-dir: expected a file or folder name, got ''"),
    ("run_hpc.py", ["--data-dir", " "], "argument --data-dir: expected a file or folder name, got ' '"),
    ("run_hpc.py", ["--dataset", "cifar10", "--data-dir=~/tiny", "--subset", "500"],
     "--subset 500 is larger than the training set (30 images)"),  # ~ is the fixture folder, as HOME
    ("plot_hpml.py", ["--results-dir", ""], "argument --results-dir: expected a file or folder name"),
    ("plot_hpml.py", ["--results-dir", "~/tiny"], "--results-dir {root}/tiny: no valid results"),
    ("utilization.py", ["--csv", ""], "argument --csv: expected a file or folder name"),
    ("sagemaker_submission.py", ["collect", "--output-dir", ""], "argument --output-dir: expected a file or folder"),
    ("bench/throughput.py", ["--json", ""], "argument --json: expected a file or folder name"),
    ("run_distributed.py", ["--backend", "nccl"], "--backend nccl needs CUDA GPUs"),
    ("run_distributed.py", ["--backend", "smddp"],
     "--backend smddp: the SMDDP library (smdistributed.dataparallel) is not installed here"),
    ("run_distributed.py", ["--dist-timeout", "0"], "--dist-timeout must be a positive number of seconds"),
    ("plot_hpml.py", ["--results-dir", "{root}/tiny"], "no valid results"),
    ("plot_hpml.py", ["--results-dir", "{root}/results", "--dpi", "0"], "--dpi"),
    ("sagemaker_submission.py", ["submit", "--dry-run", "--instance-count", "0"], "--instance-count"),
    ("sagemaker_submission.py", ["submit", "--dry-run", "--s3-data", "bucket/prefix"], "bucket/prefix"),
    ("sagemaker_submission.py", ["submit", "--dry-run", "--instance-type", "ml.g5.xlarge"], "ml.p4d.24xlarge"),
    ("sagemaker_submission.py", ["submit", "--dry-run", "--model", "lenet"], "unknown model 'lenet'"),
    ("bench/throughput.py", ["--steps", "0"], "--steps must be a positive integer, got 0"),
    ("bench/parity.py", ["--seeds", "0,x"],
     "--seeds must be a comma list of distinct integers, 0 or more, e.g. 0,1,2; got '0,x'"),
    ("bench/parity.py", ["--seeds", "1,1"], "got '1,1'"),
    ("bench/parity.py", ["--seeds", "0,-1"], "got '0,-1'"),
    ("bench/parity.py", ["--json", "{root}", "--output-dir", "{root}/parity"], "--json {root} is a folder"),
    ("bench/throughput.py", ["--json", "{root}/a-file/b.json"], "{root}/a-file is a file, not a folder"),
    ("bench/throughput.py", ["--grad-compression", "fp8"], "--grad-compression takes a comma list of"),
    ("bench/checkpoint_wait.py", ["--gap", "nan"], "--gap must be 0 or more seconds, got nan"),
    ("bench/parity.py", ["--epochs", "0", "--output-dir", "{root}/parity"], "--epochs must be a positive integer"),
    ("bench/monitor_overhead.py", ["--model", "vgg,resnet"], "--model takes one model name, got 'vgg,resnet'"),
    ("bench/monitor_overhead.py", ["--intervals", "1,0"], "--intervals must be a comma list of seconds from 0.01"),
    ("bench/allreduce.py", ["--max-bytes", "99999999G"], "argument --max-bytes: expected at most 16G, got '99999999G'"),
    ("bench/allreduce.py", ["--json", "{root}"], "--json {root} is a folder; give a file name"),
    ("bench/scaling.py", ["--single", "{root}/tiny/train.npz", "--json", ""], "argument --json: expected a file or"),
]
TRAINING_SCRIPTS = ("run_hpc.py", "run_distributed.py")
IN_A_SUBPROCESS = {"run_hpc.py --dataset cifar10 --data-dir {root}/corrupt", "bench/parity.py --seeds 0,x",
                   "run_distributed.py --backend nccl"}
IDS = [f"{s} {' '.join(a)}" for s, a, _ in CASES]


def cases(in_a_subprocess: bool) -> list:
    return [pytest.param(*case, id=name) for case, name in zip(CASES, IDS, strict=True)
            if (name in IN_A_SUBPROCESS) == in_a_subprocess]


def full_args(script: str, args: list[str], place: Path) -> list[str]:
    """The case's arguments in this place; a small run into its results folder, unless the case sets the flag."""
    if ("cuda" in args or "nccl" in args) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = [a.format(root=place) for a in args]
    if script in TRAINING_SCRIPTS:
        defaults = {**SMALL_RUN, "--output-dir": str(place / "results")}
        args += [item for flag, value in defaults.items() if flag not in args for item in (flag, value)]
    return args


def assert_refused(code: int, err: str, message: str, place: Path, before: dict) -> None:
    err = err.strip()
    assert code == 2
    assert message.format(root=place) in err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert snapshot(place / "results") == before


@pytest.mark.parametrize("script, args, message", cases(in_a_subprocess=False))
def test_bad_input(script, args, message, place, capfd, monkeypatch, bounded):
    args = full_args(script, args, place)
    monkeypatch.setattr(sys, "argv", [str(REPO / script), *args])  # the one line starts with the script's name
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.chdir(place)
    monkeypatch.setenv("HOME", str(place))
    before = snapshot(place / "results")
    with warnings.catch_warnings(record=True) as warned:  # shown as a script shows them: all but deprecations
        warnings.simplefilter("always")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        code = exit_code_of(script_main(script), args)
    err = capfd.readouterr().err + "".join(f"{w.category.__name__}: {w.message}\n" for w in warned)
    assert_refused(code, err, message, place, before)


@pytest.mark.parametrize("script, args, message", cases(in_a_subprocess=True))
def test_bad_input_in_a_subprocess(script, args, message, place):
    args = full_args(script, args, place)
    before = snapshot(place / "results")
    done = run_script(script, *args, env={"AWS_EC2_METADATA_DISABLED": "true"})
    assert_refused(done.returncode, done.stderr, message, place, before)


@pytest.mark.parametrize("script", ["run_hpc.py", "bench/throughput.py"])
def test_ctrl_c_while_torch_loads_is_one_line_and_exit_code_130(script):
    code, out, err = signalled_when([sys.executable, str(REPO / script), "--help"], {"PYTHONUNBUFFERED": "1"},
                                    lambda pid: "libtorch" in Path(f"/proc/{pid}/maps").read_text(), signal.SIGINT,
                                    "torch's import")
    assert (code, err, out) == (130, f"{Path(script).name}: interrupted\n", "")


def test_sigterm_while_a_figure_is_written_leaves_no_temp_file(tmp_path):
    results.write_results(record("r1"), tmp_path / "results")
    img = tmp_path / "img"
    command = [sys.executable, str(REPO / "plot_hpml.py"), "--results-dir", str(tmp_path / "results"), "--output-dir",
               str(img)]
    first_seen: list[float] = []

    def rendering(pid: int) -> bool:  # a figure's temp file has been there 10 ms: savefig is drawing into it
        if not first_seen and any(img.glob(".*.tmp")):
            first_seen.append(time.monotonic())
        return bool(first_seen) and time.monotonic() - first_seen[0] > 0.01

    code, _, err = signalled_when(command, {}, rendering, signal.SIGTERM, "a figure's write")
    assert (code, err) == (143, "plot_hpml.py: terminated\n")
    assert not list(img.glob(".*.tmp"))


def test_dist_timeout_too_large_for_the_c_layer_is_refused():
    with pytest.raises(UsageError, match="--dist-timeout must be at most 604800, got 1000000000000.0"):
        TrainConfig(dist_timeout=1e12).validate()


# Write errors: whatever a script writes (a samples CSV, a JSON, a figure, a checkpoint), a write that fails there is
# one line, "cannot write FILE: cause", exit code 1, no traceback. The figures folder holds a folder named Time.png,
# which the first figure's rename cannot replace, and one named as a run's checkpoint; a name of 300 bytes is longer
# than any file system takes.
LONG = "n" * 300
MEASURED = str(REPO / "bench" / "measured" / "throughput_all_models_h200.json")
BLOCKED_CHECKPOINT = "resnet18_single_w1/last.pt"
WRITE_FAILURES = [
    ("utilization.py", ["--once", "--csv", f"{{root}}/{LONG}.csv"], f"cannot write {{root}}/{LONG}.csv: File name too"),
    ("bench/throughput.py", ["--json", f"{{root}}/{LONG}.json"], f"cannot write {{root}}/{LONG}.json: File name too"),
    ("bench/scaling.py", ["--single", MEASURED, "--figure", "{figures}/S.png", "--json", f"{{root}}/{LONG}.json"],
     f"cannot write {{root}}/{LONG}.json: File name too long"),
    ("run_study.py", ["--models", "resnet18", "--world-sizes", "1", "--device", "cpu", "--output-dir",
                      "{root}/results", "--figures-dir", "{figures}"],
     "cannot write {figures}/Time.png: Is a directory"),
    ("plot_hpml.py", ["--results-dir", "{root}/results", "--output-dir", "{figures}"],
     "cannot write {figures}/Time.png: Is a directory"),
    ("run_hpc.py", [*(item for pair in SMALL_RUN.items() for item in pair), "--model", "resnet18", "--output-dir",
                    "{figures}/results", "--checkpoint-dir", "{figures}"],
     f"cannot write checkpoint {{figures}}/{BLOCKED_CHECKPOINT}: Is a directory"),
]


@pytest.mark.parametrize("script, args, message", WRITE_FAILURES, ids=[s for s, _, _ in WRITE_FAILURES])
def test_a_write_that_fails_is_one_line_naming_the_file(script, args, message, place, tmp_path, capfd, monkeypatch):
    for blocked in ("Time.png", BLOCKED_CHECKPOINT):
        (tmp_path / blocked / "a folder, not a file").mkdir(parents=True)
    args = [a.format(root=place, figures=tmp_path) for a in args]
    monkeypatch.setattr(sys, "argv", [str(REPO / script), *args])
    monkeypatch.setattr(matrix, "run_command", lambda command, signals: 1)  # a cell that fails at once: no training
    before = snapshot(place / "results")
    code = exit_code_of(script_main(script), args)
    err = capfd.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message.format(root=place, figures=tmp_path) in err
    assert snapshot(place / "results") == before


def test_a_failed_write_that_names_no_file_is_one_line(capsys):
    def main(argv):
        raise OSError(errno.EFBIG, "File too large")  # as a file object's write reports a file-size limit

    assert exit_code_of(main, []) == 1
    assert capsys.readouterr().err.endswith(": error: a write failed: File too large\n")


@pytest.mark.parametrize("interrupt, line, code", [(KeyboardInterrupt(), "interrupted", 130),
                                                   (Terminated(), "terminated", 143)], ids=["Ctrl-C", "SIGTERM"])
def test_an_import_that_a_signal_cut_short_ends_as_the_signal(interrupt, line, code, capsys):
    def main(argv):
        raise ImportError("initialization failed") from interrupt  # as a C extension's import reports it

    assert exit_code_of(main, []) == code
    assert capsys.readouterr().err.endswith(f": {line}\n")


@pytest.mark.parametrize("error", [OSError(errno.ECONNREFUSED, "Connection refused"), OSError("mode RGBA as JPEG"),
                                   ValueError("a bug"), ImportError("No module named 'x'")],
                         ids=["a socket's", "a library's message", "not an OSError", "a missing module"])
def test_an_error_about_no_file_keeps_its_traceback(error):
    def main(argv):
        raise error

    with pytest.raises(type(error)):
        cli.run_script(main, [])


# The property sweep: every flag of every script whose value is an integer, a number or a path, found in the parser
# each script's main builds, driven with every value its type must refuse.
BAD_VALUES = {
    int: ["x", "1.5", "-1", "", "99999999999999999999"],
    float: ["x", "nan", "inf", "-1", "", "1e300"],
    cli.path_flag: ["", " "],
}
SCRIPTS = ("run_hpc.py", "run_distributed.py", "utilization.py", "plot_hpml.py", "run_study.py",
           "sagemaker_submission.py", *(f"bench/{path.name}" for path in sorted((REPO / "bench").glob("*.py"))))


class ParserCaught(Exception):
    pass


def parsers_of(script: str) -> list[tuple[list[str], argparse.ArgumentParser]]:
    """(sub-command, parser) of a script's parser and of each of its sub-commands: the parser is caught as the
    script's main starts parsing."""
    def catch(parser, args=None, namespace=None):
        raise ParserCaught(parser)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
        with pytest.raises(ParserCaught) as caught:
            script_main(script)([])
    top = caught.value.args[0]
    return [([], top)] + [([name], sub) for action in top._actions
                          if isinstance(action, argparse._SubParsersAction) for name, sub in action.choices.items()]


def typed_flags(script: str) -> list[tuple[list[str], str, object]]:
    """(sub-command, flag, type) of each option of a script's parser and its sub-commands' whose type is in
    BAD_VALUES."""
    return [(words, max(action.option_strings, key=len), action.type) for words, parser in parsers_of(script)
            for action in parser._actions if action.option_strings and action.type in BAD_VALUES]


def run_in_place(script: str, args: list[str], place: Path, capfd: pytest.CaptureFixture,
                 monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """The script's exit code and stderr for `args`, run in-process in `place`; its results folder must be left as
    it was."""
    monkeypatch.setattr(sys, "argv", [str(REPO / script), *args])
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("HOME", str(place))
    monkeypatch.chdir(place)
    before = snapshot(place / "results")
    code = exit_code_of(script_main(script), args)
    assert snapshot(place / "results") == before
    return code, capfd.readouterr().err.strip()


SWEEP = [(script, words, flag, value) for script in SCRIPTS for words, flag, kind in typed_flags(script)
         for value in BAD_VALUES[kind]]


@pytest.mark.parametrize("script, words, flag, value", SWEEP,
                         ids=[" ".join([s, *w, f, repr(v)]) for s, w, f, v in SWEEP])
def test_every_bad_value_of_every_typed_flag_is_refused_naming_it(script, words, flag, value, place, capfd,
                                                                   monkeypatch, bounded):
    code, err = run_in_place(script, full_args(script, [*words, flag, value], place), place, capfd,
                             monkeypatch)
    assert code != 0 and len(err.splitlines()) <= 2 and "Traceback" not in err, err
    assert flag in err, err


# The list sweep: every flag whose value is a comma list (its help says so), each entry driven with the values its
# kind must refuse, alone and after a good entry, and an empty list of entries (",,"). A refused list trains nothing,
# waits for nothing and writes nothing; a case that would train instead fails at once (run_command, the alarm).
NAMES = ["x", "", "nan"]
LIST_ENTRIES = {  # flag: (a good entry, the bad ones)
    "--model": ("resnet18", NAMES), "--models": ("resnet18", NAMES), "--grad-compression": ("none", NAMES),
    "--cuda-graphs": ("off", NAMES),
    "--world-sizes": ("1", ["x", "1.5", "nan", "inf", "-1", "0", "1e15", "99999999999999999999", "\u0663", ""]),
    "--intervals": ("1", ["x", "nan", "inf", "-1", "0", "1e-9", "1e15", "1e20", ""]),
    "--seeds": ("0", ["x", "1.5", "-1", "1e20", "99999999999999999999", ""]),
}
NOT_SPLIT_HERE = {"--partition", "--sbatch-arg", "--dry-run"}  # handed to sbatch as given; mention commas only
CASE_SECONDS = 60


class TookTooLong(BaseException):
    """Raised by the alarm in a case that went on to train or wait: no script's handler catches it."""


@pytest.fixture
def bounded(monkeypatch):
    """A case that runs longer than CASE_SECONDS, would start a study's cell or download CIFAR-10 fails instead."""
    def stop(signum, frame):
        raise TookTooLong(f"still running after {CASE_SECONDS} s: the bad value was not refused")

    def no_cell(command, signals):
        raise TookTooLong(f"a study cell would train: {command}")

    def no_download(folder):
        raise TookTooLong(f"CIFAR-10 would be downloaded into {folder}")

    monkeypatch.setattr(matrix, "run_command", no_cell)
    monkeypatch.setattr(data, "_download", no_download)
    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(CASE_SECONDS)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def list_flags(script: str) -> list[tuple[list[str], str]]:
    """(sub-command, flag) of each option of a script whose help speaks of a comma list."""
    return [(words, max(action.option_strings, key=len)) for words, parser in parsers_of(script)
            for action in parser._actions if "comma" in (action.help or "")
            and max(action.option_strings, key=len) not in NOT_SPLIT_HERE]


def bad_lists(flag: str) -> list[str]:
    good, bad = LIST_ENTRIES[flag]
    return list(dict.fromkeys([value for entry in bad for value in (entry, f"{good},{entry}")] + [",,"]))


LIST_SWEEP = [(script, words, flag, value) for script in SCRIPTS for words, flag in list_flags(script)
              for value in bad_lists(flag)]


@pytest.mark.parametrize("script, words, flag, value", LIST_SWEEP,
                         ids=[" ".join([s, *w, f, repr(v)]) for s, w, f, v in LIST_SWEEP])
def test_every_bad_entry_of_every_list_flag_is_refused_naming_it(script, words, flag, value, place, capfd,
                                                                  monkeypatch, bounded):
    code, err = run_in_place(script, full_args(script, [*words, flag, value], place), place, capfd,
                             monkeypatch)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert flag in err, err


# The environment sweep: every variable a script reads (grep os.environ), set to each value it must refuse, through a
# script that reads it, in this process: one line naming the variable, before any training, download or rendezvous
# (an accepted value would go on to them: the alarm and run_command stop that case, failing it). The other variables
# of its kind hold good values: a world of one under torchrun, a SageMaker job's, CIFAR-10 from the environment.
NUMBERS = ["", "x", "-1", "1.5", "99999999999999999999", "\udce9"]  # "\udce9": the byte 0xe9, not UTF-8
FOLDERS = ["", "{root}/a-file", "{root}/a-file/below", "\udce9"]
DATA_FOLDERS = ["", "{root}/missing", "{root}/a-file", "\udce9"]
TEXTS = ["", "two\nlines", "\udce9"]
TORCHRUN = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "{port}", "TORCHELASTIC_RESTART_COUNT": "0"}
JOB = {"SM_TRAINING_ENV": "{{}}", "SAGEMAKER_BASE_DIR": "{root}/job"}
RUN = [*(item for pair in SMALL_RUN.items() for item in pair), "--output-dir", "{root}/results"]
CIFAR10 = ["--dataset", "cifar10", "--subset", "20", "--batch-size", "10", "--epochs", "1", "--output-dir",
           "{root}/results"]
STUDY = ["--models", "resnet18", "--world-sizes", "1", "--device", "cpu", "--output-dir", "{root}/results",
         "--figures-dir", "{root}/figures"]
ENVIRONMENT = [  # (variable, bad values, script, arguments, the good environment around it)
    ("WORLD_SIZE", [*NUMBERS, "0"], "run_distributed.py", [*RUN, "--dist-timeout", "5"], TORCHRUN),
    ("RANK", [*NUMBERS, "1"], "run_distributed.py", [*RUN, "--dist-timeout", "5"], TORCHRUN),
    ("LOCAL_RANK", [*NUMBERS, "1"], "run_distributed.py", [*RUN, "--dist-timeout", "5"], TORCHRUN),
    ("LOCAL_WORLD_SIZE", [*NUMBERS, "0"], "run_distributed.py", [*RUN, "--dist-timeout", "5"], TORCHRUN),
    ("MASTER_ADDR", ["", " ", "two words", "\udce9"], "run_distributed.py", [*RUN, "--dist-timeout", "5"], TORCHRUN),
    ("MASTER_PORT", [*NUMBERS, "0", "65536"], "run_distributed.py", [*RUN, "--dist-timeout", "5"], TORCHRUN),
    ("TORCHELASTIC_RESTART_COUNT", NUMBERS[:4] + NUMBERS[5:], "run_distributed.py", [*RUN, "--dist-timeout", "5"],
     TORCHRUN),
    ("TORCHELASTIC_RESTART_COUNT", NUMBERS[:4] + NUMBERS[5:], "run_hpc.py", RUN, {}),
    ("SM_TRAINING_ENV", ["", "x", "[]", "\udce9"], "run_hpc.py", RUN, JOB),
    ("SM_HOSTS", ["", "x", "5", "[1]", "\udce9"], "run_hpc.py", RUN, JOB),
    ("SM_FRAMEWORK_PARAMS", ["", "x", "[]", "\udce9"], "run_hpc.py", RUN, JOB),
    ("SM_NUM_GPUS", NUMBERS, "run_hpc.py", RUN, JOB),
    ("TRAINING_JOB_NAME", TEXTS, "run_hpc.py", RUN, JOB),
    ("SM_CURRENT_HOST", TEXTS, "run_hpc.py", RUN, JOB),
    ("SM_CURRENT_INSTANCE_TYPE", TEXTS, "run_hpc.py", RUN, JOB),
    ("SM_MODEL_DIR", FOLDERS, "run_hpc.py", RUN, JOB),
    ("SM_OUTPUT_DATA_DIR", FOLDERS, "run_hpc.py", RUN[:-2], JOB),
    ("SAGEMAKER_BASE_DIR", FOLDERS, "run_hpc.py", RUN, {"SM_TRAINING_ENV": "{{}}"}),
    ("SM_CHANNEL_TRAINING", DATA_FOLDERS, "run_hpc.py", CIFAR10, JOB),
    ("HPML_CIFAR10", DATA_FOLDERS, "run_hpc.py", CIFAR10, {}),
    ("OMP_NUM_THREADS", [*NUMBERS, "0"], "run_study.py", STUDY, {}),
    ("HPML_SAGEMAKER_ROLE", ["", "hpml-role", "\udce9"], "sagemaker_submission.py",
     ["submit", "--dry-run", "--dataset", "synthetic"], {}),
    ("CUDA_VISIBLE_DEVICES", ["", "x", "-1", "\udce9"], "run_hpc.py", [*RUN, "--device", "cuda"], {}),
]
READ_VARIABLES = {name for name, *_ in ENVIRONMENT} | set(TORCHRUN) | set(JOB)
ENV_SWEEP = [(name, value, script, args, env) for name, values, script, args, env in ENVIRONMENT for value in values]


@pytest.mark.parametrize("name, value, script, args, env", ENV_SWEEP,
                         ids=[f"{s} {n}={v!r}" for n, v, s, _, _ in ENV_SWEEP])
def test_every_bad_value_of_every_variable_is_refused_naming_it(name, value, script, args, env, place, capfd,
                                                                 monkeypatch, bounded):
    if script == "run_hpc.py" and "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    fill = {"root": place, "port": str(dist.free_port())}
    args = [a.format(**fill) for a in args]
    for variable in READ_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    for variable, text in {**env, name: value}.items():
        monkeypatch.setenv(variable, text.format(**fill))
    code, err = run_in_place(script, args, place, capfd, monkeypatch)
    assert code != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert name in err, err


# The record sweep: every field of the results schema (results.RECORD_FIELDS: what summary, plots, study and collect
# read) set to every value its check must refuse, or left out where it is required, in a results file beside a valid
# one: plot_hpml.py skips that file with one warning naming it and the field, and goes on with the valid one. So too
# a results file that is a FIFO, which a plain read would wait on for ever.
MISSING = object()
BAD_RECORD_VALUES = {
    results.SCHEMA: [2, "1", True, 1.5],
    results.NAME: ["", ".hidden", "../up", "a/b", "x" * 201, "r\u00e9", 7],
    results.TEXT: ["", "two\nlines", "\udce9", 7, ["a"]],
    results.STRING: [7, ["a"], {}],
    results.COUNT: ["two", 0, -1, 1.5, True, float("nan"), 10**400],
    results.SIZE: [-1, 1.5, True, "3", 10**16],
    results.AMOUNT: [float("nan"), float("inf"), -1.0, "5", True, 1e300],
    results.POSITIVE: [0, -1.0, float("nan"), "1", True, 1e300],
    results.SECONDS: [0, 1e-9, -1, float("nan"), float("inf"), "4.0", True],
    results.FRACTION: [-0.1, 1.5, float("nan"), "0.5", True],
    results.TARGET: [0, 1.5, float("nan"), "0.5"],
    results.SWITCH: ["yes", 1, 0],
    results.OBJECT: [[1], "x", 3, True],
    results.EPOCH_LIST: [[], [1], "epochs", {}, [{}] * (MAX_EPOCHS + 1)],
}


def bad_values(path: str, check: results.Check) -> list:
    values = BAD_RECORD_VALUES[dataclasses.replace(check, nullable=False)] + ([] if check.nullable else [None])
    return values + ([MISSING] if path in results.REQUIRED else [])


def with_value(path: str, value: object) -> dict:
    """A valid record whose field at `path` ("world_size", "config.lr", or "epochs[].lr": the second epoch's) holds
    `value`, or is left out when `value` is MISSING."""
    run = record("bad")
    part, _, key = path.rpartition(".")
    holder = run if not part else run["epochs"][1] if part == "epochs[]" else run.setdefault(part, {})
    if value is MISSING:
        del holder[key]
    else:
        holder[key] = value
    return run


def refusal_of(path: str, value: object) -> str:
    name, check = path.replace("[]", "[1]"), results.RECORD_FIELDS[path]
    if value is not MISSING:
        return f"{name} must be {check}, found "
    return f"missing fields: {name}" if path in results.REQUIRED_FIELDS else f"{name} is missing; it must be {check}"


RECORD_SWEEP = [(path, value) for path, check in results.RECORD_FIELDS.items() for value in bad_values(path, check)]


@pytest.mark.parametrize("path, value", RECORD_SWEEP,
                         ids=[f"{p}={'missing' if v is MISSING else repr(v)[:24]}" for p, v in RECORD_SWEEP])
def test_every_bad_value_of_every_record_field_is_skipped_naming_it(path, value, tmp_path, capsys, monkeypatch):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "bad.json").write_text(json.dumps(with_value(path, value)))
    err = plot_beside_a_good_run(tmp_path, capsys, monkeypatch)
    assert err.startswith(f"plot_hpml.py: warning: skipped {tmp_path / 'results' / 'bad.json'}: "
                          f"{refusal_of(path, value)}"), err


def test_a_results_file_that_is_a_fifo_is_skipped_not_waited_for(tmp_path, capsys, monkeypatch, bounded):
    fifo = tmp_path / "results" / "bad.json"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    err = plot_beside_a_good_run(tmp_path, capsys, monkeypatch)
    assert err.startswith(f"plot_hpml.py: warning: skipped {fifo}: [Errno 22] not a regular file"), err


def plot_beside_a_good_run(place: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> str:
    """plot_hpml.py's one warning about what a test put in place/results, beside which a valid record is written; the
    figures are left out (FIGURES emptied), as they would be drawn from the valid record alone every time."""
    runs, img = place / "results", place / "img"
    results.write_results(record("good"), runs)
    monkeypatch.setattr(plots, "FIGURES", {})
    args = ["--results-dir", str(runs), "--output-dir", str(img)]
    monkeypatch.setattr(sys, "argv", [str(REPO / "plot_hpml.py"), *args])
    assert exit_code_of(script_main("plot_hpml.py"), args) == 0
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "1 run from" in (img / "summary.md").read_text()
    return err


def test_samples_that_are_a_fifo_are_refused_not_waited_for(tmp_path, bounded):
    os.mkfifo(tmp_path / "run.utilization.csv")
    with pytest.raises(OSError, match="not a regular file"):
        monitor.read_samples_csv(tmp_path / "run.utilization.csv")
