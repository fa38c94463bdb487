"""run_study.py and hpml.study: the matrix, which cells are done, running the rest, and the figures at the end."""

import argparse
import io
import os
import re
import sys
import uuid

import pytest

from hpml import cli, jobs, results, study
from hpml.config import TrainConfig
from hpml.errors import UsageError
from tests.helpers import (
    exit_code_of,
    heavy_packages_imported_by,
    moto_account,
    no_aws_config,
    record,
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
    cells = study.plan(["vgg16", "resnet18"], study.parse_world_sizes("4,1,2,2"), repeats=2)
    assert [(c.model, c.world_size, c.repeat) for c in cells[:6]] == [
        ("vgg16", 1, 0), ("vgg16", 1, 1), ("vgg16", 2, 0), ("vgg16", 2, 1), ("vgg16", 4, 0), ("vgg16", 4, 1)]
    assert len(cells) == 12 and cells[6].model == "resnet18"


@pytest.mark.parametrize("text", ["0", "1,two", "-2", " , "])
def test_bad_world_sizes_are_one_line(text):
    with pytest.raises(UsageError, match="--world-sizes"):
        study.parse_world_sizes(text)


def test_a_cell_with_results_of_the_same_settings_is_done():
    cfg = TrainConfig(models=["resnet18"], epochs=1, dataset="synthetic").validate()
    cells = study.plan(["resnet18"], [1, 2], repeats=2)
    records = [run_record("resnet18", 1, cfg), run_record("resnet18", 2, cfg),
               run_record("resnet18", 2, TrainConfig(epochs=2, dataset="synthetic")),  # another experiment
               run_record("resnet18", 1, cfg, sagemaker={"job_name": "j"}),  # not a local run
               run_record("vgg16", 1, cfg)]
    to_run = study.cells_to_run(cells, records, cfg)
    assert [(c.world_size, c.repeat) for c in to_run] == [(1, 1), (2, 1)]
    assert study.cells_to_run(cells, records, cfg, force=True) == cells


@pytest.mark.parametrize("setting", [{"scale_lr": True}, {"grad_compression": "fp16"}, {"static_graph": True}])
def test_data_parallel_settings_tell_apart_data_parallel_runs_only(setting):
    cfg = TrainConfig(dataset="synthetic", **setting)
    plain = TrainConfig(dataset="synthetic")
    records = [run_record("resnet18", 1, plain), run_record("resnet18", 2, plain)]
    assert study.cells_to_run(study.plan(["resnet18"], [1, 2], 1), records, cfg) == [study.Cell("resnet18", 2, 0)]


def test_world_size_one_runs_the_single_device_script_larger_ones_torchrun():
    cfg = TrainConfig(models=["resnet18", "vgg16"], epochs=3, scale_lr=True, target_acc=0.5).validate()
    single = study.local_command(study.Cell("vgg16", 1, 0), cfg)
    assert single[1].endswith("run_hpc.py") and "--backend" not in single and "--scale-lr" not in single
    assert single[single.index("--model") + 1] == "vgg16" and single[single.index("--target-acc") + 1] == "0.5"
    ddp = study.local_command(study.Cell("vgg16", 4, 0), cfg)
    assert ddp[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"] and ddp[5] == "4"
    assert ddp[6].endswith("run_distributed.py") and ddp[ddp.index("--scale-lr") + 1] == "true"


def fake_training(failing: set[tuple[str, int]], ran: list[tuple[str, int]]):
    """A stand-in for a cell's training process: parses the cell's command with the training scripts' flags and
    writes a results record as the run would (or fails for the cells in `failing`)."""
    def run(command: list[str]) -> int:
        world_size = int(command[command.index("--nproc_per_node") + 1]) if "--nproc_per_node" in command else 1
        parser = argparse.ArgumentParser()
        cli.add_training_args(parser)
        cli.add_distributed_args(parser)
        args = parser.parse_args(command[next(i for i, part in enumerate(command) if part.endswith(".py")) + 1:])
        cfg = cli.config_from_args(args)
        ran.append((cfg.models[0], world_size))
        if (cfg.models[0], world_size) in failing:
            return 1
        results.write_results(run_record(cfg.models[0], world_size, cfg, backend="gloo" if world_size > 1 else None,
                                         total_train_time_s=8.5 / world_size), cfg.output_dir)
        return 0
    return run


def test_study_goes_on_after_a_failed_cell_draws_and_a_rerun_does_only_the_rest(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(study, "run_command", fake_training({("shufflenetv2", 2)}, ran))
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
    monkeypatch.setattr(study, "run_command", fake_training(set(), ran))
    assert exit_code_of(script_main("run_study.py"), argv) == 0
    assert ran == [("shufflenetv2", 2)] and "4 cells: 3 already in" in capsys.readouterr().out


def test_bad_training_flag_stops_the_study_before_it_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, "run_command", pytest.fail)
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


def stand_in(folder, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch, srun and scontrol stand-ins on PATH: sbatch runs the script at once as SLURM would on one node, srun
    writes the command it was given to srun.log instead of running it. Returns srun.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in(bin_dir, "sbatch", 'n=$(( $(cat "$0.count" 2>/dev/null || echo 0) + 1 )); echo $n > "$0.count"\n'
                                'SLURM_JOB_ID=$n SLURM_NNODES=1 SLURM_JOB_NODELIST=node1 bash "$1" || exit 1\n'
                                'echo "Submitted batch job $n"\n')
    stand_in(bin_dir, "srun", f'echo "$@" >> {tmp_path / "srun.log"}\n')
    stand_in(bin_dir, "scontrol", "echo node1\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return tmp_path / "srun.log"


def test_slurm_submits_one_batch_script_per_cell_once_then_collect_draws(tmp_path, fake_slurm, capsys):
    out = tmp_path / "out"
    argv = ["--where", "slurm", "--models", "resnet18", "--world-sizes", "1,8", *FLAGS, "--output-dir", str(out),
            "--figures-dir", str(tmp_path / "fig")]
    assert exit_code_of(script_main("run_study.py"), [*argv, "--dry-run"]) == 0
    assert "#SBATCH --nodes=2" in capsys.readouterr().out and not out.joinpath("slurm").exists()

    assert exit_code_of(script_main("run_study.py"), argv) == 0
    single, ddp = fake_slurm.read_text().splitlines()
    assert "run_hpc.py --model resnet18 --epochs 1" in single
    assert "torch.distributed.run --nnodes 1 --nproc_per_node 4 --rdzv-id 2" in ddp and "--backend auto" in ddp
    (script,) = (out / "slurm").glob("hpml-resnet18-w8-r1-*.sbatch")
    assert "#SBATCH --gpus-per-node=4" in script.read_text()
    assert "submitted as job 2" in capsys.readouterr().out

    assert exit_code_of(script_main("run_study.py"), argv) == 0  # nothing submitted twice
    assert len(fake_slurm.read_text().splitlines()) == 2 and "submitted before as job 1" in capsys.readouterr().out
    assert exit_code_of(script_main("run_study.py"), [*argv, "--epochs", "2"]) == 0  # another study: new jobs
    assert len(fake_slurm.read_text().splitlines()) == 4 and "submitted as job 4" in capsys.readouterr().out

    cfg = TrainConfig(models=["resnet18"], dataset="synthetic", subset=64, epochs=1, batch_size=16)
    results.write_results(run_record("resnet18", 1, cfg), out)
    assert exit_code_of(script_main("run_study.py"), [*argv, "--collect"]) == 1
    assert "1 of 2 cells finished; no results yet for resnet18 x8" in capsys.readouterr().out
    assert (tmp_path / "fig" / "Time.png").exists()
    results.write_results(run_record("resnet18", 8, cfg, backend="nccl"), out)
    assert exit_code_of(script_main("run_study.py"), [*argv, "--collect"]) == 0


@pytest.mark.parametrize("flags, message", [
    (["--where", "slurm", "--world-sizes", "6"], "--world-sizes 6 does not fill whole nodes of --gpus-per-node 4"),
    (["--where", "slurm", "--time-limit", "an hour"], "--time-limit must be a SLURM time"),
    (["--collect"], "--collect gathers the results of --where slurm jobs"),
])
def test_bad_slurm_flags_are_one_line(flags, message, tmp_path, capsys):
    assert exit_code_of(script_main("run_study.py"), [*flags, "--output-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


ROLE = "arn:aws:iam::123456789012:role/hpml-test"
SAGEMAKER = ["--where", "sagemaker", "--models", "shufflenetv2", "--world-sizes", "1,8", "--dataset", "synthetic",
             "--epochs", "2", "--region", "us-east-1"]


def test_sagemaker_dry_run_prints_the_plan_with_costs_and_sends_nothing(tmp_path, monkeypatch, capsys):
    no_aws_config(monkeypatch, tmp_path)
    monkeypatch.setattr(jobs, "aws_session", pytest.fail)
    argv = [*SAGEMAKER, "--epoch-seconds", "30", "--output-dir", str(tmp_path / "out"), "--dry-run"]
    assert exit_code_of(script_main("run_study.py"), argv) == 0
    out = capsys.readouterr().out
    assert "Dry run: nothing was sent to AWS. The study's 3 jobs:" in out
    assert re.search(r"hpml-shufflenetv2-none-w1-r1-\w{8}: ml.p3.2xlarge × 1, none, new; ~\$0.06 for 2 × 30.0 s per "
                     r"epoch \(stated by --epoch-seconds", out)
    assert "ml.p4d.24xlarge × 1, smddp, new" in out and "ml.p4d.24xlarge × 1, torchrun, new" in out


def test_sagemaker_world_sizes_must_fill_whole_instances(tmp_path, capsys):
    argv = [*SAGEMAKER, "--world-sizes", "1,4", "--output-dir", str(tmp_path), "--dry-run"]
    assert exit_code_of(script_main("run_study.py"), argv) == 2
    assert "--world-sizes 4 does not fill whole ml.p4d.24xlarge instances of 8 GPUs" in capsys.readouterr().err


def test_sagemaker_study_submits_tagged_jobs_once_and_collect_finds_them(tmp_path, capsys):
    argv = [*SAGEMAKER, "--role", ROLE, "--bucket", "hpml-study", "--output-dir", str(tmp_path / "out"),
            "--figures-dir", str(tmp_path / "fig"), "--yes"]
    with moto_account(tmp_path, "hpml-study") as session:
        assert exit_code_of(script_main("run_study.py"), argv) == 0
        out = capsys.readouterr().out
        names = sorted(job["TrainingJobName"] for job in jobs.suite_jobs(session))
        assert [name.rsplit("-", 2)[0] for name in names] == [
            "hpml-shufflenetv2-none-w1", "hpml-shufflenetv2-smddp-w8", "hpml-shufflenetv2-torchrun-w8"]
        assert all(f"submitted {name}" in out for name in names) and "3 of 3 jobs completed" in out
        assert session.client("sagemaker").describe_training_job(TrainingJobName=names[1])[
            "ResourceConfig"]["InstanceType"] == "ml.p4d.24xlarge"

        assert exit_code_of(script_main("run_study.py"), argv) == 0  # picks the jobs up, submits nothing
        out = capsys.readouterr().out
        assert "(3 submitted before)" in out and "submitted hpml" not in out
        assert sorted(job["TrainingJobName"] for job in jobs.suite_jobs(session)) == names
        assert exit_code_of(script_main("sagemaker_submission.py"), ["collect", "--all"]) == 0
        assert "3 jobs to collect" in capsys.readouterr().out


@pytest.mark.parametrize("answer", ["", "n\n"])
def test_sagemaker_study_submits_nothing_unless_confirmed(answer, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(jobs, "aws_session", lambda region, profile: None)
    monkeypatch.setattr(jobs, "suite_jobs", lambda boto: [])
    monkeypatch.setattr(jobs, "submit", pytest.fail)
    monkeypatch.setattr(sys, "stdin", io.StringIO(answer))
    argv = [*SAGEMAKER, "--role", ROLE, "--output-dir", str(tmp_path)]
    assert exit_code_of(script_main("run_study.py"), argv) == 1
    assert "submit 3 new jobs? [y/N] nothing submitted" in capsys.readouterr().out


@pytest.mark.parametrize("threads, expected", [(None, "1"), ("3", "3")])
def test_each_training_process_gets_one_thread_unless_told(threads, expected, monkeypatch):
    seen = []
    monkeypatch.setattr(study.subprocess, "run", lambda command, env: seen.append(env) or argparse.Namespace(
        returncode=0))
    if threads is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
    assert study.run_command(["true"]) == 0 and seen[0]["OMP_NUM_THREADS"] == expected


def test_the_study_modules_import_no_torch():
    assert heavy_packages_imported_by("hpml.study", "hpml.slurm", "hpml.sagemaker_plan") == []
