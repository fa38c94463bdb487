"""run_study.py and hpml.study.matrix: the runs, which cells are done, running the rest, and the figures at the end."""

import argparse
import shlex
import sys
import uuid

import pytest

from hpml import cli, monitor, results
from hpml.config import TrainConfig
from hpml.errors import UsageError
from hpml.study import matrix
from tests.helpers import (
    exit_code_of,
    heavy_packages_imported_by,
    record,
    refusal,
    results_in,
    run_script,
    script_main,
)

FLAGS = ["--dataset", "synthetic", "--subset", "64", "--epochs", "1", "--batch-size", "16"]


def run_record(model: str, world_size: int, cfg: TrainConfig, **overrides) -> dict:
    """A results record of a run of this model and world size with cfg's settings."""
    mode = "single" if world_size == 1 else "distributed"
    return record(f"{model}_w{world_size}_{uuid.uuid4().hex[:6]}", model=model, world_size=world_size, mode=mode,
                  config=cfg.as_dict(), **overrides)


def test_plan_is_models_by_world_sizes_by_repeats_baseline_first():
    cells = matrix.plan(["vgg16", "resnet18"], matrix.parse_world_sizes("4,1,2,2"), repeats=2)
    assert [(c.model, c.world_size, c.repeat) for c in cells[:6]] == [
        ("vgg16", 1, 0), ("vgg16", 1, 1), ("vgg16", 2, 0), ("vgg16", 2, 1), ("vgg16", 4, 0), ("vgg16", 4, 1)]
    assert len(cells) == 12 and cells[6].model == "resnet18"


@pytest.mark.parametrize("text", ["0", "1,two", "-2", " , "])
def test_bad_world_sizes_are_one_line(text):
    with pytest.raises(UsageError, match="--world-sizes"):
        matrix.parse_world_sizes(text)


def test_a_cell_with_results_of_the_same_settings_is_done():
    cfg = TrainConfig(models=["resnet18"], epochs=1, dataset="synthetic").validate()
    cells = matrix.plan(["resnet18"], [1, 2], repeats=2)
    records = [run_record("resnet18", 1, cfg), run_record("resnet18", 2, cfg),
               run_record("resnet18", 2, TrainConfig(epochs=2, dataset="synthetic")),  # another experiment
               run_record("resnet18", 1, cfg, sagemaker={"job_name": "j"}),  # not a local run
               run_record("vgg16", 1, cfg)]
    to_run = matrix.cells_to_run(cells, records, cfg)
    assert [(c.world_size, c.repeat) for c in to_run] == [(1, 1), (2, 1)]
    assert matrix.cells_to_run(cells, records, cfg, force=True) == cells


@pytest.mark.parametrize("setting", [{"scale_lr": True}, {"grad_compression": "fp16"}, {"static_graph": True}])
def test_data_parallel_settings_tell_apart_data_parallel_runs_only(setting):
    cfg = TrainConfig(dataset="synthetic", **setting)
    plain = TrainConfig(dataset="synthetic")
    records = [run_record("resnet18", 1, plain), run_record("resnet18", 2, plain)]
    assert matrix.cells_to_run(matrix.plan(["resnet18"], [1, 2], 1), records, cfg) == [matrix.Cell("resnet18", 2, 0)]


@pytest.mark.parametrize("setting", [{"precision": "fp32"}, {"loader": "torch"}, {"channels_last": False},
                                     {"cuda_graphs": False}, {"compile": True}, {"drop_last": False},
                                     {"dataset": "cifar10", "data_dir": "/elsewhere"}])
def test_every_speed_setting_and_the_data_make_another_experiment(setting):
    base = TrainConfig(dataset="cifar10", data_dir="/data") if "data_dir" in setting else TrainConfig()
    cfg = TrainConfig(**{**base.as_dict(), **setting})
    cells = matrix.plan(["resnet18"], [1, 2], 1)
    assert matrix.cells_to_run(cells, [run_record("resnet18", size, base) for size in (1, 2)], cfg) == cells
    assert (matrix.settings_id(cfg, cells[1]) == matrix.settings_id(base, cells[1])) == ("data_dir" in setting)


def test_runs_on_another_gpu_or_cpu_model_are_not_this_studys_cells():
    cfg, cell = TrainConfig(), matrix.Cell("resnet18", 1, 0)
    here = run_record("resnet18", 1, cfg, environment={"cpu": "AMD EPYC 7B13"})
    elsewhere = run_record("resnet18", 1, cfg, device="cuda", environment={"gpu": "Tesla V100-SXM2-16GB"})
    assert matrix.cells_to_run([cell], [elsewhere, here], cfg, trained_on="CPU AMD EPYC 7B13") == []
    assert matrix.cells_to_run([cell], [elsewhere], cfg, trained_on="CPU AMD EPYC 7B13") == [cell]
    assert matrix.cells_to_run([cell], [here], cfg, trained_on="GPU Tesla V100-SXM2-16GB") == [cell]


def test_every_cell_of_a_data_parallel_study_gets_one_cuda_graphs_setting():
    cfg = matrix.common_speed_settings(TrainConfig(), [1, 2])
    commands = [matrix.local_command(matrix.Cell("resnet18", size, 0), cfg) for size in (1, 2)]
    assert all(command[command.index("--cuda-graphs") + 1] == "false" for command in commands)
    assert matrix.common_speed_settings(TrainConfig(), [1]).cuda_graphs is None  # one GPU: the script's default
    assert matrix.common_speed_settings(TrainConfig(cuda_graphs=True), [1, 2]).cuda_graphs is True


def test_world_size_one_runs_the_single_device_script_larger_ones_torchrun():
    cfg = TrainConfig(models=["resnet18", "vgg16"], epochs=3, scale_lr=True, target_acc=0.5).validate()
    single = matrix.local_command(matrix.Cell("vgg16", 1, 0), cfg)
    assert single[1:3] == ["-m", "hpml.scripts.run_hpc"] and "--backend" not in single and "--scale-lr" not in single
    assert single[single.index("--model") + 1] == "vgg16" and single[single.index("--target-acc") + 1] == "0.5"
    ddp = matrix.local_command(matrix.Cell("vgg16", 4, 0), cfg)
    assert ddp[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"] and ddp[5] == "4"
    assert ddp[6:8] == ["-m", "hpml.scripts.run_distributed"] and ddp[ddp.index("--scale-lr") + 1] == "true"


def fake_training(failing: set[tuple[str, int]], ran: list[tuple[str, int]]):
    """A stand-in for a cell's training process: parses the cell's command with the training scripts' flags and
    writes a results record as the run would (or fails for the cells in `failing`)."""
    def run(command: list[str], signals: matrix.CellSignals) -> int:
        world_size = int(command[command.index("--nproc_per_node") + 1]) if "--nproc_per_node" in command else 1
        parser = argparse.ArgumentParser()
        cli.add_training_args(parser)
        cli.add_distributed_args(parser)
        module = next(i for i, part in enumerate(command) if part.startswith("hpml.scripts."))
        args = parser.parse_args(command[module + 1:])
        cfg = cli.config_from_args(args)
        ran.append((cfg.models[0], world_size))
        if (cfg.models[0], world_size) in failing:
            return 1
        results.write_results(run_record(cfg.models[0], world_size, cfg, backend="gloo" if world_size > 1 else None,
                                         environment={"cpu": results.cpu_name()},
                                         epoch_times=(8.5 / world_size,)), cfg.output_dir)
        return 0
    return run


def test_study_goes_on_after_a_failed_cell_draws_and_a_rerun_does_only_the_rest(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(matrix, "run_command", fake_training({("shufflenetv2", 2)}, ran))
    argv = ["--models", "resnet18,shufflenetv2", "--world-sizes", "1,2", *FLAGS, "--output-dir", str(tmp_path / "out"),
            "--figures-dir", str(tmp_path / "fig")]
    assert exit_code_of(script_main("run_study.py"), argv) == 1
    out = capsys.readouterr().out
    assert ran == [("resnet18", 1), ("resnet18", 2), ("shufflenetv2", 1), ("shufflenetv2", 2)]
    assert "[4/4] shufflenetv2 x2 (distributed) #1: FAILED · 0 to do" in out and "[1/4] resnet18 x1" in out
    assert "failed: shufflenetv2 x2" in out and "3 of 4 cells finished" in out
    assert len(results_in(tmp_path / "out")) == 3
    assert {p.name for p in (tmp_path / "fig").iterdir()} >= {"Time.png", "Accuracy.png", "summary.md"}
    assert "| 2.00× | 100% |" in (tmp_path / "fig" / "summary.md").read_text()

    ran.clear()
    monkeypatch.setattr(matrix, "run_command", fake_training(set(), ran))
    assert exit_code_of(script_main("run_study.py"), argv) == 0
    assert ran == [("shufflenetv2", 2)]
    assert f"4 cells on CPU {results.cpu_name()}: 3 already in" in capsys.readouterr().out


def test_bad_training_flag_stops_the_study_before_it_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(matrix, "run_command", pytest.fail)
    argv = ["--models", "resnet18", "--target-acc", "1.5", "--output-dir", str(tmp_path)]
    assert exit_code_of(script_main("run_study.py"), argv) == 2
    assert "--target-acc" in capsys.readouterr().err and not list(tmp_path.iterdir())


@pytest.mark.slow  # two real trainings (one under torchrun): a minute or more on two shared cores
def test_a_real_study_on_the_cpu_then_its_rerun_skips_every_cell(tmp_path):
    argv = ["--models", "shufflenetv2", "--world-sizes", "1,2", *FLAGS, "--quiet",
            "--output-dir", str(tmp_path / "out"), "--figures-dir", str(tmp_path / "fig")]
    first = run_script("run_study.py", *argv)
    assert first.returncode == 0, first.stderr
    assert sorted((r["mode"], r["world_size"]) for r in results_in(tmp_path / "out")) == [("distributed", 2),
                                                                                          ("single", 1)]
    assert (tmp_path / "fig" / "Time.png").exists()
    again = run_script("run_study.py", *argv)
    assert again.returncode == 0 and "2 cells: 2 already in" in again.stdout and "---" not in again.stdout


@pytest.mark.parametrize("threads, expected", [(None, "1"), ("3", "3")])
def test_each_training_process_gets_one_thread_unless_told(threads, expected, monkeypatch):
    if threads is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
    command = [sys.executable, "-c", "import os, sys; sys.exit(0 if os.environ['OMP_NUM_THREADS'] == sys.argv[1] "
               "else 1)", expected]
    assert matrix.run_command(command, matrix.CellSignals()) == 0


@pytest.mark.parametrize("threads", ["", "0", "-1", "two", "4,2"])
def test_an_omp_num_threads_the_cells_cannot_use_is_refused_before_the_first_cell(threads, tmp_path, monkeypatch,
                                                                                 capsys):
    monkeypatch.setattr(matrix, "run_command", pytest.fail)
    monkeypatch.setenv("OMP_NUM_THREADS", threads)
    for where in ("local", "slurm"):
        err = refusal(script_main("run_study.py"), ["--where", where, "--models", "resnet18", *FLAGS,
                                                    "--output-dir", str(tmp_path / "out")], capsys)
        assert ("OMP_NUM_THREADS must be a positive integer (CPU threads per training process) or unset, got "
                f"{threads!r}") in err
    assert not (tmp_path / "out").exists()


def test_device_cuda_without_a_gpu_is_refused_before_the_first_cell(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(matrix, "run_command", pytest.fail)
    monkeypatch.setattr(monitor, "first_cuda_gpu_name", lambda: None)
    argv = ["--models", "resnet18,vgg16", *FLAGS, "--device", "cuda", "--output-dir", str(tmp_path / "out")]
    err = refusal(script_main("run_study.py"), argv, capsys)
    assert ": error: --device cuda: no GPU here (NVML finds none; this machine has a CPU " in err
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(monitor, "first_cuda_gpu_name", lambda: "NVIDIA H100 80GB HBM3")
    assert exit_code_of(script_main("run_study.py"), [*argv, "--dry-run"]) == 0
    assert "4 cells on GPU NVIDIA H100 80GB HBM3: 0 already in" in capsys.readouterr().out
    assert exit_code_of(script_main("run_study.py"), [*argv, "--where", "slurm", "--dry-run"]) == 0  # not seen here


def test_printed_commands_are_shell_quoted(tmp_path, monkeypatch, capsys):
    out = tmp_path / "it's a $(touch PWNED) dir; ls"
    argv = ["--models", "resnet18", "--world-sizes", "1,2", *FLAGS, "--output-dir", str(out)]
    assert exit_code_of(script_main("run_study.py"), [*argv, "--dry-run"]) == 0
    dry_run = capsys.readouterr().out.splitlines()[1:]
    monkeypatch.setattr(matrix, "run_command", lambda command, signals: 1)
    assert exit_code_of(script_main("run_study.py"), argv) == 1
    logged = [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines() if line.startswith("--- ")]
    for commands in (dry_run, logged):
        assert [shlex.split(line)[shlex.split(line).index("--output-dir") + 1] for line in commands] == [str(out)] * 2


def test_the_study_modules_import_no_torch():
    assert heavy_packages_imported_by("hpml.study.matrix", "hpml.platforms.slurm",
                                      "hpml.platforms.sagemaker.plan") == []
