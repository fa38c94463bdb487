"""run_distributed.py under real torchrun with the gloo backend on the CPU."""

import gc
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import run_distributed
from hpml.config import TrainConfig, check_grad_compression
from hpml.errors import RunStopped, UsageError
from hpml.monitor import read_samples_csv
from hpml.training import dist
from hpml.training.dist import free_port
from hpml.training.loop import seed_all
from tests import ddp_equivalence
from tests.helpers import REPO, refusal, results_in, run_script, write_npz


def torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """Two ranks on a tiny npz set whose 51 test images do not divide by the world size."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 80), ("test", 51)):
        np.savez(folder / f"{split}.npz", images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 labels=np.arange(n) % 10)
    out = tmp_path_factory.mktemp("results")
    done = torchrun("run_distributed.py", "--model", "resnet18", "--data-dir", str(folder), "--batch-size", "20",
                    "--epochs", "2", "--workers", "0", "--utilization", "--sample-interval", "0.2",
                    "--output-dir", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    return done, results_in(out), out


def test_two_ranks_write_one_results_file(two_rank_run):
    _, records, _ = two_rank_run
    (record,) = records
    assert record["mode"] == "distributed" and record["backend"] == "gloo" and record["world_size"] == 2
    assert record["nodes"] == 1 and record["launcher"] == "torchrun"
    assert record["batch_size"] == 20 and record["global_batch_size"] == 40
    assert record["lr"] == 0.1  # not scaled by default


def test_every_training_and_test_image_counted_exactly_once(two_rank_run):
    _, (record,), _ = two_rank_run
    for epoch in record["epochs"]:
        assert epoch["train_images"] == 80
        assert epoch["test_images"] == 51


def test_monitor_gathers_every_ranks_samples_on_rank_zero(two_rank_run):
    _, (record,), out = two_rank_run
    summary = record["utilization"]
    assert summary["samples"] >= 2 and summary["mean_cpu_pct"] is not None
    rows = read_samples_csv(out / summary["samples_csv"])
    assert {row["rank"] for row in rows} == {0, 1}


def test_only_rank_zero_logs(two_rank_run):
    done, _, _ = two_rank_run
    assert done.stdout.count("resnet18 epoch 1/2") == 1
    assert done.stdout.count("final test acc") == 1


def test_two_ranks_with_half_batches_match_one_process(tmp_path):
    """Same data, same augmentation, same steps: 2 x B/2 under DDP gives one process's weights with B."""
    single, double = tmp_path / "single.pt", tmp_path / "double.pt"
    ddp_equivalence.main(16, str(single))  # a world of one, in this process
    done = torchrun("-m", "tests.ddp_equivalence", "8", str(double))
    assert done.returncode == 0, done.stderr
    one, two = torch.load(single)["none"], torch.load(double)
    seed_all(0)  # as the worker seeds before building the model
    untrained = ddp_equivalence.small_cnn().state_dict()
    for name in one:
        assert not torch.allclose(one[name], untrained[name])  # the steps did move every tensor
        for setting in ("none", "small buckets, static graph"):  # the same sums, sent otherwise
            torch.testing.assert_close(two[setting][name], one[name], rtol=1e-4, atol=1e-5)
        # Gradients rounded to 16 bits on the way: within the stated tolerance of the fp32 run.
        torch.testing.assert_close(two["fp16"][name], one[name], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(two["bf16"][name], one[name], rtol=1e-2, atol=1e-3)
        # PowerSGD sends a rank-1 approximation: it trains (every tensor moved, all finite), not to the same weights.
        assert not torch.allclose(two["powersgd"][name], untrained[name])
        assert torch.isfinite(two["powersgd"][name]).all()
        # Nearer the plain all-reduce's weights than those are to the untrained ones.
        trained = (two["none"][name] - untrained[name]).abs().max()
        assert (two["powersgd"][name] - two["none"][name]).abs().max() < trained
    # The hooks did compress: weights the tolerances above would accept, but not the plain all-reduce's.
    for setting in ("fp16", "bf16", "powersgd"):
        assert not all(torch.equal(two[setting][name], two["none"][name]) for name in one), setting
    # The last epoch's metrics, the test set evaluated in halves by the two ranks: the whole set's, as one process's.
    alone, shared = (json.loads(path.with_suffix(".json").read_text()) for path in (single, double))
    assert shared["test_images"] == alone["test_images"] == 100
    assert shared["train_images"] == alone["train_images"] == 64
    assert shared["test_loss"] == pytest.approx(alone["test_loss"], rel=1e-5)
    assert shared["train_loss"] == pytest.approx(alone["train_loss"], rel=1e-5)
    assert shared["test_acc"] == pytest.approx(alone["test_acc"], abs=0.011)  # an image may tip either way
    assert shared["train_acc"] == pytest.approx(alone["train_acc"], abs=0.016)


def test_plain_python_trains_as_a_world_of_one(npz_dir, tmp_path):
    done = run_script("run_distributed.py", "--model", "shufflenet", "--data-dir", str(npz_dir), "--subset", "20",
                      "--batch-size", "10", "--epochs", "1", "--workers", "0", "--output-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "training as a world of one process" in done.stdout
    (record,) = results_in(tmp_path)
    assert record["world_size"] == 1 and record["backend"] == "gloo" and record["mode"] == "distributed"
    assert record["launcher"] == "none"


def test_scale_lr_and_the_communication_options_reach_the_record(npz_dir, tmp_path):
    done = torchrun("run_distributed.py", "--model", "shufflenet", "--data-dir", str(npz_dir), "--subset", "20",
                    "--batch-size", "10", "--epochs", "1", "--workers", "0", "--lr", "0.5", "--scale-lr",
                    "--grad-compression", "powersgd", "--bucket-cap-mb", "1", "--static-graph",
                    "--quiet", "--output-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    (record,) = results_in(tmp_path)
    assert record["lr"] == 1.0 and record["epochs"][0]["lr"] == 1.0
    assert {key: record["config"][key] for key in ("grad_compression", "bucket_cap_mb", "static_graph")} == \
        {"grad_compression": "powersgd", "bucket_cap_mb": 1.0, "static_graph": True}


@pytest.mark.parametrize("argv, message", [
    (["--grad-compression", "int8"], "argument --grad-compression: invalid choice: 'int8'"),
    (["--bucket-cap-mb", "0"], "--bucket-cap-mb must be a positive number of megabytes, got 0.0"),
    (["--bucket-cap-mb", "nan"], "--bucket-cap-mb must be a positive number of megabytes, got nan"),
    (["--static-graph", "sometimes"], "expected true or false, got 'sometimes'"),
])
@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")  # @record, under pytest's captured stderr
def test_bad_communication_options_are_one_line(argv, message, capsys, tmp_path):
    assert message in refusal(run_distributed.main, [*argv, "--output-dir", str(tmp_path)], capsys)


def test_grad_compression_is_refused_on_smddp_only():
    with pytest.raises(UsageError, match="--grad-compression fp16 is not available with the smddp backend"):
        check_grad_compression("fp16", "smddp")
    for compression, backend in (("none", "smddp"), ("bf16", "gloo"), ("powersgd", "nccl"), ("fp16", None)):
        check_grad_compression(compression, backend)


def test_a_killed_rank_fails_the_job_instead_of_hanging(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "run_distributed.py", "--model", "resnet18", "--dataset", "synthetic", "--subset",
               "2000", "--batch-size", "10", "--epochs", "5", "--workers", "0", "--output-dir", str(tmp_path)]
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                       if "run_distributed.py" in " ".join(p.cmdline())]
            if len(workers) == 2 and all(p.cpu_times().user > 3 for p in workers):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the two ranks never started training")
        workers[1].send_signal(signal.SIGKILL)
        output, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert "run_distributed.py FAILED" in output and "Signal 9 (SIGKILL)" in output
    assert not results_in(tmp_path)


SMDDP_JOB = json.dumps({"additional_framework_parameters": {"sagemaker_distributed_dataparallel_enabled": True}})
CPU = torch.device("cpu")


@pytest.fixture
def smddp_job(monkeypatch) -> None:
    """The environment of a SageMaker job submitted with --distribution smddp, here without the SMDDP library."""
    for name in ("SM_FRAMEWORK_PARAMS", "SMDATAPARALLEL_USE_SINGLENODE", "SMDATAPARALLEL_USE_HOMOGENEOUS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SM_TRAINING_ENV", SMDDP_JOB)


def test_smddps_launcher_is_known_by_its_own_flag_whatever_else_is_set(monkeypatch):
    monkeypatch.delenv("SMDATAPARALLEL_USE_SINGLENODE", raising=False)
    monkeypatch.delenv("SMDATAPARALLEL_USE_HOMOGENEOUS", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "8")
    assert dist.launcher_from_env() == "torchrun"
    monkeypatch.setenv("SMDATAPARALLEL_USE_HOMOGENEOUS", "1")
    assert dist.launcher_from_env() == "smddprun"


@pytest.mark.parametrize("requested", ["auto", "smddp"])
@pytest.mark.parametrize("launcher", ["smddprun", "torchrun"])
def test_a_job_submitted_for_smddp_runs_smddp_or_says_why_not(smddp_job, requested, launcher):
    with pytest.raises(UsageError) as refused:
        dist.choose_backend(requested, CPU, launcher)
    assert str(refused.value) == ("this SageMaker job was submitted for SMDDP, but the SMDDP library "
                                  "(smdistributed.dataparallel) is not installed here; it exists only in SageMaker's "
                                  "GPU training containers")


def test_another_backend_in_a_job_submitted_for_smddp_is_refused(smddp_job):
    with pytest.raises(UsageError, match="^--backend gloo: this SageMaker job was submitted for SMDDP"):
        dist.choose_backend("gloo", CPU, "torchrun")


@pytest.mark.parametrize("requested", ["auto", "smddp"])
def test_smddp_on_a_device_its_backend_does_not_run_on_is_refused_however_chosen(smddp_job, requested, monkeypatch):
    monkeypatch.setattr(dist, "smddp_available", lambda: True)
    monkeypatch.setitem(torch.distributed.Backend.backend_capability, "smddp", ["cuda"])
    with pytest.raises(UsageError, match="SMDDP needs CUDA GPUs, and this process has device cpu"):
        dist.choose_backend(requested, CPU, "smddprun")


def test_inside_sagemaker_a_world_of_one_says_nothing_of_torchrun(monkeypatch, tmp_path):
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "SMDATAPARALLEL_USE_SINGLENODE", "SM_FRAMEWORK_PARAMS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SM_TRAINING_ENV", "{}")
    logged = []
    world = dist.setup(TrainConfig(device="cpu", output_dir=str(tmp_path)).validate(), log=logged.append)
    dist.teardown()
    assert world.backend == "gloo" and world.launcher == "none" and world.sagemaker is not None
    assert logged == ["run_distributed.py: no launcher: training as a world of one process"]


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK, MASTER_ADDR, MASTER_PORT are not"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "WORLD_SIZE is set but MASTER_PORT is not"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     "RANK 2 must be below WORLD_SIZE 2"),
    ({"WORLD_SIZE": "two", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     "environment variable WORLD_SIZE must be an integer 0 or more, got 'two'"),
    ({"LOCAL_RANK": "0.5"}, "environment variable LOCAL_RANK must be an integer 0 or more, got '0.5'"),
])
def test_a_malformed_launcher_environment_is_named_in_one_line(env, message, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match=message):
        dist.setup(TrainConfig(device="cpu", dist_timeout=5), log=lambda line: None)


@pytest.mark.parametrize("rank", ["0", "1"])  # rank 0 waits for the others; rank 1 cannot reach rank 0
def test_a_group_that_never_forms_stops_at_dist_timeout_in_one_line(rank, monkeypatch):
    for name in ("LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"WORLD_SIZE": "2", "RANK": rank, "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    started = time.monotonic()
    with pytest.raises(RunStopped) as stopped:
        dist.setup(TrainConfig(device="cpu", dist_timeout=1).validate(), log=lambda line: None)
    assert stopped.value.exit_code == 1 and time.monotonic() - started < 30
    assert str(stopped.value).startswith(f"rank {rank} of 2: the group did not form within --dist-timeout 1 s (Dist")
    assert "\n" not in str(stopped.value)


def test_a_lost_rank_is_one_line_and_other_errors_pass_through():
    gloo = ("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:43418. This is typically "
            "caused by a remote worker crashing.")
    lost = r"^rank 1 of 2: lost \(RuntimeError: \[gloo.*Connection closed by peer"
    with pytest.raises(RunStopped, match=lost), dist.ranks_lost_in_one_line("rank 1 of 2: lost"):
        raise RuntimeError(gloo)
    with pytest.raises(RuntimeError, match="shape mismatch"), dist.ranks_lost_in_one_line("rank 1 of 2: lost"):
        raise RuntimeError("shape mismatch")


def test_an_error_a_rank_reports_in_one_line_is_not_reprinted_by_torchrun(tmp_path):
    data_dir = write_npz(tmp_path / "data", train=40, test=20)
    with np.load(data_dir / "train.npz") as split:
        np.savez(data_dir / "train.npz", images=split["images"], labels=split["labels"] + 0.5)
    done = torchrun("run_distributed.py", "--data-dir", str(data_dir), "--epochs", "1", "--workers", "0",
                    "--output-dir", str(tmp_path / "out"), "--dist-timeout", "60")
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "run_distributed.py: error: " in output and "labels" in output  # rank 0's one line
    assert "UsageError" not in output and "[rank1]" not in output, output  # no rank's traceback, first or again
    assert output.count("Traceback (most recent call last)") <= 1, output  # torchrun's own, of its ChildFailedError


def test_no_ddp_model_outlives_the_process_group(npz_dir, tmp_path, monkeypatch):
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "SMDATAPARALLEL_USE_SINGLENODE", "SM_TRAINING_ENV"):
        monkeypatch.delenv(name, raising=False)
    gc.collect()
    gc.disable()  # as at interpreter shutdown: only what teardown frees is gone
    try:
        assert run_distributed.main(["--model", "shufflenet", "--data-dir", str(npz_dir), "--batch-size", "50",
                                     "--epochs", "1", "--workers", "0", "--output-dir", str(tmp_path), "--quiet"]) == 0
        alive = [thing for thing in gc.get_objects() if type(thing) is DistributedDataParallel]
    finally:
        gc.enable()
    assert alive == []
