"""run_study.py --where slurm against stand-ins for sbatch, srun, sacct, squeue and scontrol: one batch script per
cell, submitted once, and again only when its job failed or SLURM no longer knows it."""

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpml import results
from hpml.config import TrainConfig
from tests.helpers import REPO, exit_code_of, refusal, script_main
from tests.study.test_study import FLAGS, run_record


def stand_in(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


@dataclass
class FakeSlurm:
    bin_dir: Path
    jobs: Path  # a file per job id: the job's state, as sacct prints it ("CANCELLED by 1000")
    srun_log: Path  # the commands srun was given, one a line

    def disable_accounting(self) -> None:
        stand_in(self.bin_dir, "sacct", 'echo "Slurm accounting storage is disabled" >&2; exit 1\n')


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> FakeSlurm:
    """sbatch runs the script at once as SLURM would on one node and records the job's end state (its output in
    jobs/<id>.out, its arguments, one a line, in jobs/<id>.argv), srun writes the command it was given to srun.log
    instead of running it; sacct, squeue and scontrol report the recorded state in their formats, and an unknown job
    as SLURM does."""
    fake = FakeSlurm(tmp_path / "bin", tmp_path / "jobs", tmp_path / "srun.log")
    fake.bin_dir.mkdir()
    fake.jobs.mkdir()
    stand_in(fake.bin_dir, "sbatch", 'n=$(( $(cat "$0.count" 2>/dev/null || echo 0) + 1 )); echo $n > "$0.count"\n'
                                     f'printf "%s\\n" "$@" > {fake.jobs}/$n.argv\n'
                                     'if SLURM_JOB_ID=$n SLURM_NNODES=1 SLURM_JOB_NODELIST=node1 '
                                     f'bash "${{@: -1}}" > {fake.jobs}/$n.out; then echo COMPLETED; else echo FAILED; '
                                     f'fi > {fake.jobs}/$n\n'
                                     'echo "Submitted batch job $n"\n')
    stand_in(fake.bin_dir, "srun", f'echo "$@" >> {fake.srun_log}\n')
    stand_in(fake.bin_dir, "sacct", f'for a; do case $a in --jobs=*) cat {fake.jobs}/${{a#--jobs=}} 2>/dev/null;; '
                                    'esac; done; exit 0\n')
    stand_in(fake.bin_dir, "squeue", f'for a; do case $a in --jobs=*) job=${{a#--jobs=}};; esac; done\n'
                                     f'read -r state _ < {fake.jobs}/$job 2>/dev/null '
                                     '|| { echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1; }\n'
                                     'echo "$state"\n')
    stand_in(fake.bin_dir, "scontrol", '[ "$2" = hostnames ] && { echo node1; exit 0; }\n'
                                       f'read -r state _ < {fake.jobs}/$3 2>/dev/null '
                                       '|| { echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1; }\n'
                                       'echo "JobId=$3 JobName=hpml"\n'
                                       'echo "   JobState=$state Reason=None Dependency=(null)"\n')
    monkeypatch.setenv("PATH", f"{fake.bin_dir}:{os.environ['PATH']}")
    return fake


def test_slurm_submits_one_batch_script_per_cell_once_then_collect_draws(tmp_path, fake_slurm, capsys):
    out = tmp_path / "out"
    argv = ["--where", "slurm", "--models", "resnet18", "--world-sizes", "1,8", *FLAGS, "--output-dir", str(out),
            "--figures-dir", str(tmp_path / "fig")]
    assert exit_code_of(script_main("run_study.py"), [*argv, "--dry-run"]) == 0
    assert "#SBATCH --nodes=2" in capsys.readouterr().out and not out.joinpath("slurm").exists()

    assert exit_code_of(script_main("run_study.py"), argv) == 0
    single, ddp = fake_slurm.srun_log.read_text().splitlines()
    assert "-m hpml.scripts.run_hpc --model resnet18 --epochs 1" in single
    assert "torch.distributed.run --nnodes 1 --nproc_per_node 4 --rdzv-id 2" in ddp and "--backend auto" in ddp
    assert "-m hpml.scripts.run_distributed --model resnet18" in ddp
    assert "--rdzv-endpoint node1:20002" in ddp  # a port of the job's own: 20000 + its id
    (script,) = (out / "slurm").glob("hpml-resnet18-w8-r1-*.sbatch")
    assert "#SBATCH --gpus-per-node=4" in script.read_text()
    assert "submitted as job 2" in capsys.readouterr().out

    assert exit_code_of(script_main("run_study.py"), argv) == 0  # the jobs COMPLETED: not again, though no results
    assert len(fake_slurm.srun_log.read_text().splitlines()) == 2
    printed = capsys.readouterr().out
    assert "job 1 COMPLETED but its results are not in --output-dir" in printed
    assert "--collect" not in printed  # nothing submitted, nothing to wait for
    assert exit_code_of(script_main("run_study.py"), [*argv, "--epochs", "2"]) == 0  # another study: new jobs
    assert len(fake_slurm.srun_log.read_text().splitlines()) == 4 and "submitted as job 4" in capsys.readouterr().out

    cfg = TrainConfig(models=["resnet18"], dataset="synthetic", subset=64, epochs=1, batch_size=16,
                      cuda_graphs=False)
    results.write_results(run_record("resnet18", 1, cfg), out)
    assert exit_code_of(script_main("run_study.py"), [*argv, "--collect"]) == 1
    assert "1 of 2 cells finished; no results yet for resnet18 x8" in capsys.readouterr().out
    assert (tmp_path / "fig" / "Time.png").exists()
    results.write_results(run_record("resnet18", 8, cfg, backend="nccl"), out)
    assert exit_code_of(script_main("run_study.py"), [*argv, "--collect"]) == 0


@pytest.mark.parametrize("state, accounting, missing, said, again", [
    ("FAILED", True, (), "job 1 FAILED, submitting again", True),
    ("CANCELLED by 1000", True, (), "job 1 CANCELLED, submitting again", True),
    ("RUNNING", True, (), "job 1 is RUNNING, not again", False),
    ("PENDING", True, (), "job 1 is PENDING, not again", False),
    (None, True, (), "job 1 is unknown to sacct, squeue and scontrol", True),  # gone from SLURM's memory
    ("RUNNING", False, (), "job 1 is RUNNING, not again", False),  # squeue says
    ("TIMEOUT", False, ("squeue",), "job 1 TIMEOUT, submitting again", True),  # scontrol says
    ("RUNNING", True, ("sacct", "squeue", "scontrol"), "job 1 is unknown to sacct", True),
])
def test_a_rerun_submits_a_cell_again_only_when_its_job_failed_or_is_unknown(state, accounting, missing, said, again,
                                                                             tmp_path, fake_slurm, capsys):
    out = tmp_path / "out"
    argv = ["--where", "slurm", "--models", "resnet18", "--world-sizes", "1", *FLAGS, "--output-dir", str(out)]
    assert exit_code_of(script_main("run_study.py"), argv) == 0
    if state:
        (fake_slurm.jobs / "1").write_text(state + "\n")
    else:
        (fake_slurm.jobs / "1").unlink()
    if not accounting:
        fake_slurm.disable_accounting()
    for command in missing:
        (fake_slurm.bin_dir / command).unlink()
    capsys.readouterr()

    assert exit_code_of(script_main("run_study.py"), argv) == 0
    printed = capsys.readouterr().out
    assert f"resnet18 x1 (single) #1: {said}" in printed
    assert ("resnet18 x1 (single) #1: submitted as job 2" in printed) == again
    assert ("when the jobs have ended, run the same command with --collect" in printed) == again
    assert len(fake_slurm.srun_log.read_text().splitlines()) == (2 if again else 1)
    (job_file,) = (out / "slurm").glob("hpml-resnet18-w1-r1-*.job")
    assert job_file.read_text() == ("2\n" if again else "1\n")


@pytest.mark.parametrize("marker, said", [
    ("fifo", "cannot read {}: not a regular file (a FIFO, a socket or a device); delete {} to submit the cell again"),
    ("1; scancel -u root\n", "{} must hold the SLURM job id this study wrote there, got '1; scancel -u root'; "
                              "delete {} to submit the cell again"),
])
def test_a_cells_job_marker_that_is_not_one_is_refused_in_one_line(marker, said, tmp_path, fake_slurm, capsys):
    out = tmp_path / "out"
    argv = ["--where", "slurm", "--models", "resnet18", "--world-sizes", "1", *FLAGS, "--output-dir", str(out)]
    assert exit_code_of(script_main("run_study.py"), argv) == 0
    (job_file,) = (out / "slurm").glob("*.job")
    job_file.unlink()
    if marker == "fifo":
        os.mkfifo(job_file)  # read as a file, it would wait for a writer for ever
    else:
        job_file.write_text(marker)
    capsys.readouterr()
    assert exit_code_of(script_main("run_study.py"), argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said.format(job_file, job_file) in err
    assert len(fake_slurm.srun_log.read_text().splitlines()) == 1  # nothing submitted again


@pytest.mark.parametrize("flags, message", [
    (["--world-sizes", "6"], "--world-sizes 6 does not fill whole nodes of --gpus-per-node 4; use a size up to 4"),
    (["--gpus-per-node", "0", "--processes-per-node", "2", "--world-sizes", "3"],
     "--world-sizes 3 does not fill whole nodes of --processes-per-node 2; use a size up to 2 or a multiple of it"),
    (["--time-limit", "an hour"], "--time-limit must be a SLURM time such as 30, 45:00, 01:00:00 or 1-00:00:00, "
                                  "got 'an hour'"),
    (["--gpus-per-node", "-1"], "--gpus-per-node must be 0 (CPU nodes) to 256, got -1"),
    (["--gpus-per-node", "0", "--processes-per-node", "0"], "--processes-per-node must be 1 to 256, got 0"),
    (["--gpus-per-node", "2", "--processes-per-node", "4"], "--processes-per-node 4 is more than --gpus-per-node 2"),
    (["--cpus-per-task", "0"], "--cpus-per-task must be 1 to 4096, got 0"),
    (["--partition", "gpu a100"], "--partition must be a partition name or comma list of them (letters, digits, "
                                  "'_', '-', '.'), got 'gpu a100'"),
    (["--account", "me;rm -rf"], "--account must be an account name (letters, digits, '_', '-', '.'), got 'me;rm -rf'"),
    (["--qos", ""], "--qos must be a QOS name (letters, digits, '_', '-', '.'), got ''"),
    (["--constraint", "a100 #x"], "--constraint must be node features joined by &, |, [...], *count (letters, "
                                  "digits, '_', '-', '.', &, |, ',', *, :, [, ], (, )), got 'a100 #x'"),
    (["--sbatch-arg", "mem=8G"], "--sbatch-arg must be one sbatch option with its value, starting with '-' and "
                                 "without control characters (e.g. --sbatch-arg=--mem=8G), got 'mem=8G'"),
    (["--sbatch-arg=--comment=a\nb"], "--sbatch-arg must be one sbatch option with its value, starting with '-' "
                                      "and without control characters (e.g. --sbatch-arg=--mem=8G), got "
                                      "'--comment=a\\nb'"),
    (["--setup", "echo \x1b[31m"], "--setup must be shell lines without control characters other than newlines "
                                   "and tabs, got 'echo \\x1b[31m'"),
    (["--setup", "module load cuda", "--setup", "if true; then"], "--setup must be lines bash can run: "),
])
def test_bad_slurm_flags_are_one_line(flags, message, tmp_path, capsys):
    err = refusal(script_main("run_study.py"), ["--where", "slurm", *flags, "--output-dir", str(tmp_path / "out")],
                  capsys)
    assert message in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["local", "sagemaker"])
def test_counts_no_node_has_are_refused_wherever_the_study_runs(where, tmp_path, capsys):
    argv = ["--where", where, "--cpus-per-task", "5000", "--output-dir", str(tmp_path / "out")]
    assert "--cpus-per-task must be 1 to 4096, got 5000" in refusal(script_main("run_study.py"), argv, capsys)


def test_collect_is_for_slurm_only(tmp_path, capsys):
    err = refusal(script_main("run_study.py"), ["--collect", "--output-dir", str(tmp_path / "out")], capsys)
    assert "--collect gathers the results of --where slurm jobs" in err and not (tmp_path / "out").exists()


def dry_run_scripts(argv: list[str], capsys: pytest.CaptureFixture) -> list[str]:
    """The batch scripts `run_study.py --where slurm --dry-run` prints, in the order of its cells."""
    capsys.readouterr()
    assert exit_code_of(script_main("run_study.py"), ["--where", "slurm", "--dry-run", *argv]) == 0
    return capsys.readouterr().out.split("\n# sbatch ")[1:]


@pytest.mark.parametrize("flags, size, asked", [
    ([], 2, ["--nodes=1", "--gpus-per-node=2", "--cpus-per-task=8", "THREADS:-4}", "--nproc_per_node 2 "]),
    ([], 8, ["--nodes=2", "--gpus-per-node=4", "--cpus-per-task=16", "THREADS:-4}", "--nproc_per_node 4 "]),
    (["--processes-per-node", "2"], 4, ["--nodes=2", "--gpus-per-node=2", "--cpus-per-task=8", "--nproc_per_node 2 "]),
    (["--gpus-per-node", "0"], 1, ["--nodes=1", "--cpus-per-task=1", "THREADS:-1}", "-m hpml.scripts.run_hpc "]),
    (["--gpus-per-node", "0"], 2, ["--nodes=2", "--cpus-per-task=1", "THREADS:-1}", "--nproc_per_node 1 "]),
    (["--gpus-per-node", "0", "--processes-per-node", "2", "--cpus-per-task", "6"], 4,
     ["--nodes=2", "--cpus-per-task=6", "THREADS:-3}", "--nproc_per_node 2 "]),
])
def test_a_job_asks_for_the_nodes_gpus_and_cpus_of_its_world_size(flags, size, asked, tmp_path, capsys):
    (script,) = dry_run_scripts(["--models", "resnet18", "--world-sizes", str(size), *flags, *FLAGS,
                                 "--output-dir", str(tmp_path / "out")], capsys)
    lines = script.replace("OMP_NUM_THREADS", "THREADS").replace("#SBATCH ", "")
    assert [text for text in asked if text not in lines] == []
    assert ("--gpus-per-node=" in lines) == ("--gpus-per-node=" in "".join(asked))  # none on CPU nodes


def test_partition_account_qos_constraint_sbatch_args_and_setup_reach_the_job(tmp_path, fake_slurm, monkeypatch,
                                                                             capsys):
    monkeypatch.chdir(tmp_path)  # where the stand-in sbatch runs the script
    out = tmp_path / "out"
    setup = ['echo "set up ${NOT_SET_YET:-}" > setup.txt',  # before `set -u`, which activate scripts may not take
             "export HPML_SET_UP=1\nmodule() { :; }; module load cuda"]
    argv = ["--where", "slurm", "--models", "resnet18", "--world-sizes", "1", *FLAGS, "--output-dir", str(out),
            "--partition", "debug,gpu", "--account", "proj-1", "--qos", "high", "--constraint", "a100|h100*2",
            "--sbatch-arg=--mem=8G", "--sbatch-arg=--exclusive", "--setup", setup[0], "--setup", setup[1]]
    assert exit_code_of(script_main("run_study.py"), argv) == 0
    (script,) = (out / "slurm").glob("*.sbatch")
    text = script.read_text()
    for line in ("--partition=debug,gpu", "--account=proj-1", "--qos=high", "--constraint=a100|h100*2"):
        assert f"\n#SBATCH {line}\n" in text
    assert "\n".join(setup) in text and (tmp_path / "setup.txt").read_text() == "set up \n"
    argv = (fake_slurm.jobs / "1.argv").read_text().splitlines()
    assert argv[:2] == ["--mem=8G", "--exclusive"] and argv[2].startswith("--output=") and argv[3] == str(script)
    # With --setup, the python on the PATH it leaves; without, this one.
    assert fake_slurm.srun_log.read_text().startswith("python -m hpml.scripts.run_hpc --model resnet18")
    assert f"\nexport PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}\n" in text  # this checkout's hpml
    argv = ["--where", "slurm", "--models", "shufflenetv2", "--world-sizes", "1", *FLAGS, "--output-dir", str(out)]
    assert exit_code_of(script_main("run_study.py"), argv) == 0
    assert fake_slurm.srun_log.read_text().splitlines()[1].startswith(f"{sys.executable} -m hpml.scripts.run_hpc")


def test_a_dry_run_into_a_pipe_closed_early_ends_quietly(tmp_path):
    """`run_study.py --dry-run | head`: more scripts than the pipe holds, and the reader gone after a line."""
    command = [sys.executable, str(REPO / "run_study.py"), "--where", "slurm", "--dry-run", "--models", "all",
               "--world-sizes", "1,2,4,8", "--repeats", "10", "--output-dir", str(tmp_path / "out")]
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as study:
        assert study.stdout.readline() == f"200 cells: 0 already in {tmp_path / 'out'}, 200 to run\n"
        study.stdout.close()
        err = study.stderr.read()
    assert (study.returncode, err) == (141, "")


def test_an_output_dir_with_shell_syntax_stays_one_argument_and_runs_nothing(tmp_path, fake_slurm, monkeypatch,
                                                                             capsys):
    monkeypatch.chdir(tmp_path)  # where the stand-in sbatch runs the scripts: an injected command would leave files
    out = tmp_path / "my out; touch INJECTED $(touch INJECTED) `touch INJECTED` 'x\" 100%"
    stand_in(fake_slurm.bin_dir, "srun", f'printf "%s\\0" "$@" >> {tmp_path}/srun.args\n')
    argv = ["--where", "slurm", "--models", "resnet18", "--world-sizes", "1,2", *FLAGS, "--output-dir", str(out)]
    assert exit_code_of(script_main("run_study.py"), [*argv, "--dry-run"]) == 0
    shown = [shlex.split(line[2:]) for line in capsys.readouterr().out.splitlines() if line.startswith("# sbatch ")]
    names = [Path(command[-1]).stem for command in shown]
    sbatch = [["sbatch", f"--output={str(out).replace('%', '%%')}/slurm/{name}-%j.out", f"{out}/slurm/{name}.sbatch"]
              for name in names]
    assert len(shown) == 2 and shown == sbatch

    assert exit_code_of(script_main("run_study.py"), argv) == 0
    for name in names:
        script = out / "slurm" / f"{name}.sbatch"
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        assert "#SBATCH --output" not in script.read_text()
    assert [(fake_slurm.jobs / f"{job}.argv").read_text() for job in (1, 2)] == ["".join(f"{arg}\n" for arg in cmd[1:])
                                                                                 for cmd in sbatch]
    arguments = (tmp_path / "srun.args").read_text().split("\0")
    assert arguments.count(str(out)) == 2 and not list(tmp_path.rglob("INJECTED"))


@pytest.mark.parametrize("bad", ["out\ntouch INJECTED #", "out\rx", "out\\x"])
def test_an_output_dir_sbatch_cannot_take_is_refused_in_one_line(bad, tmp_path, fake_slurm, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--where", "slurm", "--models", "resnet18", *FLAGS, "--output-dir", str(tmp_path / bad)]
    err = refusal(script_main("run_study.py"), argv, capsys)
    assert "--output-dir must not contain a newline, another control character or a backslash" in err
    assert repr(str(tmp_path / bad)) in err and not list(tmp_path.glob("out*")) and not fake_slurm.srun_log.exists()
