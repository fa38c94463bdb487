"""The bench/ scripts run end to end on the CPU and report what the README promises.

Each calls the script's main in this process, except the DDP scaling bench, which runs throughput.py as a user
would (it starts torchrun itself); parity trains on an npz set with a small test split.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, exit_code_of, refusal, script_main, write_npz

THROUGHPUT = ["--model", "shufflenetv2", "--device", "cpu", "--batch-size", "16", "--steps", "2", "--repeats", "1"]


def bench(capsys, script: str, *argv: str) -> tuple[str, str]:
    """Run bench/<script>'s main(argv) in this process, as its __main__ does; (stdout, stderr) of a run that passed."""
    capsys.readouterr()
    code = exit_code_of(script_main(f"bench/{script}"), argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def run_bench(tmp_path: Path, capsys, *extra: str) -> dict:
    out = tmp_path / "b.json"
    stdout, _ = bench(capsys, "throughput.py", *THROUGHPUT, "--json", str(out), *extra)
    assert "shufflenetv2" in stdout
    return json.loads(out.read_text())


def test_bench_writes_reference_fast_and_their_ratio(tmp_path, capsys):
    report = run_bench(tmp_path, capsys)
    assert report["device"].startswith("cpu: ")
    figures = report["models"]["shufflenetv2"]
    assert figures["reference_images_per_s"] > 0 and figures["fast_images_per_s"] > 0
    assert figures["speedup"] == pytest.approx(figures["fast_images_per_s"] / figures["reference_images_per_s"])
    assert {setup: len(rates) for setup, rates in figures["repeats_images_per_s"].items()} == \
        {"reference": 1, "fast": 1}  # --repeats 1: the median is the one timed epoch
    assert figures["repeats_images_per_s"]["fast"] == [figures["fast_images_per_s"]]
    assert figures["reference_settings"] == {"loader": "torch", "precision": "fp32", "channels_last": False,
                                             "compile": False, "cuda_graphs": False}
    assert "ablations" not in figures


@pytest.mark.slow  # four more processes than the --ddp test below, whose torchrun and DDP it shares
def test_bench_nproc_measures_ddp_scaling_under_torchrun(tmp_path):
    out = tmp_path / "b.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "throughput.py"), *THROUGHPUT, "--json", str(out),
                           "--nproc", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "shufflenetv2" in done.stdout
    ddp = json.loads(out.read_text())["ddp"]
    assert ddp["nproc"] == 2
    figures = ddp["models"]["shufflenetv2"]
    assert figures["one_rank_images_per_s"] > 0 and figures["n_rank_images_per_s"] > 0
    assert figures["scaling_efficiency"] == pytest.approx(
        figures["n_rank_images_per_s"] / (2 * figures["one_rank_images_per_s"]))


@pytest.mark.slow  # compiles the model: a minute or more on two cores
def test_bench_ablate_measures_each_setting(tmp_path, capsys):
    ablations = run_bench(tmp_path, capsys, "--ablate")["models"]["shufflenetv2"]["ablations"]
    assert set(ablations) == {"fast, fp32", "fast, NCHW", "fast, torch loader", "fast + compile"}
    assert all(a["images_per_s"] > 0 for a in ablations.values())


@pytest.fixture
def run_parity(tmp_path, capsys):
    """parity.py on 40 training and 20 test images; (stdout, report) of a run with these extra flags."""
    data_dir = write_npz(tmp_path / "npz", train=40, test=20)

    def run(*extra: str) -> tuple[str, dict]:
        out = tmp_path / "p.json"
        stdout, _ = bench(capsys, "parity.py", "--model", "shufflenetv2", "--device", "cpu", "--dataset", "cifar10",
                          "--data-dir", str(data_dir), "--subset", "40", "--batch-size", "16", "--drop-last", "false",
                          "--output-dir", str(tmp_path / "runs"), "--json", str(out), *extra)
        return stdout, json.loads(out.read_text())

    return run


def test_parity_trains_both_setups_per_seed_and_compares_their_accuracy(run_parity, tmp_path):
    _, report = run_parity("--epochs", "1", "--seeds", "3,5")
    assert report["drop_last"] is False
    report = report["models"]["shufflenetv2"]
    for setup in ("fast", "reference"):
        runs = report["runs"][setup]
        assert [run["seed"] for run in runs] == [3, 5]
        assert sorted(p.name for p in (tmp_path / "runs" / setup).glob("*.json")) == \
            sorted(Path(run["results_file"]).name for run in runs)
        assert all(json.loads(Path(run["results_file"]).read_text())["config"]["drop_last"] is False for run in runs)
        final = [run["final_test_acc"] for run in runs]
        assert report["summary"][setup]["final_test_acc"]["mean"] == pytest.approx(sum(final) / 2)
    assert report["runs"]["reference"][0]["speed"]["loader"] == "torch"
    assert report["runs"]["fast"][0]["speed"]["loader"] == "device"
    difference = report["summary"]["final_test_acc_difference"]
    assert difference["fast_minus_reference"] == pytest.approx(
        report["summary"]["fast"]["final_test_acc"]["mean"] - report["summary"]["reference"]["final_test_acc"]["mean"])


def test_parity_resume_reads_back_finished_runs_of_the_same_settings_only(run_parity, tmp_path):
    _, first = run_parity("--epochs", "1", "--seeds", "3")
    stdout, second = run_parity("--epochs", "1", "--seeds", "3,5", "--resume")
    for setup in ("fast", "reference"):
        earlier, now = first["models"]["shufflenetv2"]["runs"][setup], second["models"]["shufflenetv2"]["runs"][setup]
        assert now[0] == earlier[0]  # seed 3, read back: the same file and figures
        assert now[1]["seed"] == 5 and now[1]["results_file"] != earlier[0]["results_file"]
        assert len(list((tmp_path / "runs" / setup).glob("*.json"))) == 2
    assert stdout.count("read back from") == 2
    stdout, _ = run_parity("--epochs", "2", "--seeds", "3", "--resume")  # other settings: trained again
    assert "read back" not in stdout
    assert len(list((tmp_path / "runs" / "fast").glob("*.json"))) == 3


def test_checkpoint_wait_measures_both_ways_of_saving(tmp_path, capsys):
    stdout, _ = bench(capsys, "checkpoint_wait.py", "--model", "shufflenetv2", "--device", "cpu", "--repeats", "1",
                      "--gap", "0", "--dir", str(tmp_path))
    megabytes, blocking, background, ratio = stdout.splitlines()[-1].split()[1:]
    assert float(megabytes) > 10 and float(blocking) > 0 and float(background) > 0 and ratio.endswith("x")
    assert list(tmp_path.iterdir()) == []  # the temp folder is gone


def test_monitor_overhead_times_the_training_loop_with_and_without_sampling(capsys):
    stdout, stderr = bench(capsys, "monitor_overhead.py", "--model", "shufflenetv2", "--device", "cpu",
                           "--batch-size", "4", "--steps", "2", "--repeats", "2", "--intervals", "0.2")
    assert "shufflenetv2 on cpu" in stdout
    assert any(f"batch 4, {precision}, 2 steps per trial" in stdout for precision in ("bf16", "fp32"))
    ratios = [float(line.split("ratio ")[1].split()[0]) for line in stdout.splitlines() if "ratio" in line]
    assert len(ratios) == 2 and all(0.2 < ratio < 5 for ratio in ratios)  # wall time and process CPU time
    assert stderr.count("repeat ") == 2


def test_allreduce_under_torchrun_prints_and_writes_every_size(tmp_path):
    out = tmp_path / "allreduce.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "bench" / "allreduce.py"), "--max-bytes", "4M", "--iters", "2", "--warmup", "1",
                           "--device", "cpu", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "on gloo, 2 ranks" in done.stdout and "shufflenetv2 bf16" in done.stdout  # 2.5 MB of bf16 gradients
    report = json.loads(out.read_text())
    assert [row["bytes"] for row in report["sizes"]] == [8 * 2**k for k in range(20)]  # 8 B to 4 MiB, doubling
    for row in report["sizes"]:
        assert row["time_us"] > 0 and row["algbw_gbps"] == pytest.approx(row["bytes"] / row["time_us"] / 1e3)
        assert row["busbw_gbps"] == pytest.approx(row["algbw_gbps"])  # 2(n-1)/n = 1 for two ranks
    assert report["models"]["resnet18"] == {"params": 11_173_962, "fp32_bytes": 44_695_848, "bf16_bytes": 22_347_924}


@pytest.mark.parametrize("argv, message", [
    ([], "no launcher: start the ranks with torchrun"),
    (["--min-bytes", "1M", "--max-bytes", "64K"], "--min-bytes 1048576 is larger than --max-bytes 65536"),
    (["--max-bytes", "2"], "expected at least 4 bytes"),
    (["--max-bytes", "12Q"], "expected a byte count such as 8, 64K, 256M or 1G, got '12Q'"),
])
def test_allreduce_refuses_bad_input_in_one_line(argv, message, capsys):
    assert message in refusal(script_main("bench/allreduce.py"), argv, capsys)


def test_ddp_measures_the_step_with_and_without_gradient_synchronisation(tmp_path):
    out = tmp_path / "ddp.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "bench" / "throughput.py"), *THROUGHPUT, "--ddp", "--grad-compression",
                           "none,fp16", "--profile", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "2 ranks, gloo" in done.stdout
    report = json.loads(out.read_text())
    assert (report["world_size"], report["backend"]) == (2, "gloo")
    for compression in ("none", "fp16"):
        figures = report["models"]["shufflenetv2"][compression]
        assert figures["step_ms"] > 0 and figures["no_sync_step_ms"] > 0
        assert figures["exposed_ms"] == pytest.approx(figures["step_ms"] - figures["no_sync_step_ms"])
        assert {setup: len(times) for setup, times in figures["repeats_step_ms"].items()} == {"synced": 1,
                                                                                             "no_sync": 1}
        (profiled,) = figures["profile"]["repeats"]  # --profile: the trace's breakdown after the round
        assert figures["profile"]["exposed_communication_share"] == profiled["exposed_communication_share"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--ddp"], "--ddp: start it under torchrun"),
    (["--ddp", "--nproc", "2"], "--ddp measures one world under torchrun; run --nproc and --ablate without it"),
    (["--grad-compression", "none,zip"], "--grad-compression takes a comma list of none, fp16, bf16, powersgd, "
                                         "got 'zip'"),
    (["--cuda-graphs", "off,maybe"], "--cuda-graphs takes a comma list of off and on, got 'off,maybe'"),
    (["--cuda-graphs", "on"], "--cuda-graphs on is for --ddp"),
    (["--profile"], "--profile compares with --ddp's measurement; add --ddp"),
])
def test_throughput_refuses_bad_ddp_flags_in_one_line(argv, message, capsys):
    assert message in refusal(script_main("bench/throughput.py"), argv, capsys)


def test_scaling_check_tests_a_prediction_free_of_its_measurement_and_names_the_what_if_pairing(tmp_path, capsys):
    """The check is the no-overlap prediction, with its spread over --ddp's paired rounds; the overlap prediction,
    the no-sync step itself when communication hides, is labelled as no test; the projection names both machines."""
    allreduce = {"backend": "gloo", "world_size": 2, "environment": {"cpu": "CPU X", "cpu_count": 2, "gpu": None},
                 "sizes": [{"bytes": 8 * 2**k, "time_us": 100.0 + 8 * 2**k / 1e3,
                            "busbw_gbps": 8 * 2**k / (100.0 + 8 * 2**k / 1e3) / 1e3} for k in range(22)]}
    rounds = {"synced": [130.0, 120.0, 110.0], "no_sync": [100.0, 100.0, 100.0]}  # run back to back, per round
    ddp = {"backend": "gloo", "world_size": 2, "device": "cpu: CPU X (1 thread)",
           "environment": {"cpu": "CPU X", "cpu_count": 2, "gpu": None},
           "models": {"shufflenetv2": {"none": {"step_ms": 120.0, "no_sync_step_ms": 100.0,
                                                "repeats_step_ms": rounds}}}}
    single = {"device": "GPU X", "batch_size": 128, "environment": {"gpu": "GPU X", "cpu": "CPU Y"},
              "models": {"resnet18": {"fast_images_per_s": 12800.0}}}
    paths = {name: tmp_path / f"{name}.json" for name in ("allreduce", "ddp", "single")}
    for name, report in (("allreduce", allreduce), ("ddp", ddp), ("single", single)):
        paths[name].write_text(json.dumps(report))
    out = tmp_path / "scaling.json"
    stdout, _ = bench(capsys, "scaling.py", *(f"--{name}={path}" for name, path in paths.items()),
                      "--figure", str(tmp_path / "Scaling.png"), "--json", str(out))
    report = json.loads(out.read_text())
    checked = report["check"]
    assert checked["measured_on"] == checked["link"]["measured_on"] == "CPU X, 2 cores, no GPU"
    figures = checked["models"]["shufflenetv2"]
    # 5.1 MB of fp32 gradients over the fitted 1 GB/s: about 5 ms, which the assumed 67 ms of backward pass hides
    communication = figures["communication_ms"]
    assert 4.5 < communication < 5.5
    assert figures["predicted_step_ms_no_overlap"] == pytest.approx(100.0 + communication)
    assert figures["error_no_overlap"] == pytest.approx((100.0 + communication) / 120.0 - 1)
    assert figures["error_no_overlap_per_repeat"] == pytest.approx(
        [(100.0 + communication) / synced - 1 for synced in rounds["synced"]])
    assert figures["exposed_ms_per_repeat"] == pytest.approx([30.0, 20.0, 10.0])
    assert figures["error_no_overlap_within_noise"] is False  # all three rounds: predicted shorter than measured
    # with overlap: the no-sync measurement itself, so it is no test, and says so
    assert figures["predicted_step_ms"] == pytest.approx(figures["compute_ms"]) == pytest.approx(100.0)
    assert figures["overlap_is_a_test"] is False
    assert "error_no_overlap" in checked["test"] and "not a test" in checked["with_overlap"]
    assert "not a test" in stdout and "= the no-sync step: communication hid" in stdout
    projected = report["projection"]
    assert projected["step_time_measured_on"] == "GPU X"
    assert projected["link_hardware"] == "AWS ml.p4d.24xlarge (8 NVIDIA A100 per node)"
    assert "GPU X" in projected["what_if"] and "A100" in projected["what_if"]
    assert "not a measurement of any one" in projected["what_if"] and projected["what_if"] in stdout


def test_scaling_check_within_noise_when_the_rounds_straddle_the_prediction():
    bench_module = sys.modules[script_main("bench/scaling.py").__module__]
    spread = bench_module.per_repeat({"synced": [90.0, 130.0], "no_sync": [100.0, 100.0]}, communication_ms=5.0)
    assert spread["error_no_overlap_per_repeat"] == pytest.approx([105 / 90 - 1, 105 / 130 - 1])
    assert spread["error_no_overlap_within_noise"] is True
    assert bench_module.per_repeat(None, 5.0) == {}  # a --ddp file without repeats: no spread to report
