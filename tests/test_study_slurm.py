"""run_study.py --where slurm against stand-ins for sbatch, srun, sacct, squeue and scontrol: one batch script per
cell, submitted once, and again only when its job failed or SLURM no longer knows it."""

import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpml import results
from hpml.config import TrainConfig
from tests.helpers import exit_code_of, refusal, script_main
from tests.test_study import FLAGS, run_record


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
    """sbatch runs the script at once as SLURM would on one node and records the job's end state (and its first
    argument, the --output option, in jobs/<id>.output), srun writes the
    command it was given to srun.log instead of running it; sacct, squeue and scontrol report the recorded state
    in their formats, and an unknown job as SLURM does."""
    fake = FakeSlurm(tmp_path / "bin", tmp_path / "jobs", tmp_path / "srun.log")
    fake.bin_dir.mkdir()
    fake.jobs.mkdir()
    stand_in(fake.bin_dir, "sbatch", 'n=$(( $(cat "$0.count" 2>/dev/null || echo 0) + 1 )); echo $n > "$0.count"\n'
                                     f'printf "%s\\n" "$1" > {fake.jobs}/$n.output\n'
                                     'if SLURM_JOB_ID=$n SLURM_NNODES=1 SLURM_JOB_NODELIST=node1 bash "${@: -1}"; '
                                     f'then echo COMPLETED; else echo FAILED; fi > {fake.jobs}/$n\n'
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
    assert "run_hpc.py --model resnet18 --epochs 1" in single
    assert "torch.distributed.run --nnodes 1 --nproc_per_node 4 --rdzv-id 2" in ddp and "--backend auto" in ddp
    (script,) = (out / "slurm").glob("hpml-resnet18-w8-r1-*.sbatch")
    assert "#SBATCH --gpus-per-node=4" in script.read_text()
    assert "submitted as job 2" in capsys.readouterr().out

    assert exit_code_of(script_main("run_study.py"), argv) == 0  # the jobs COMPLETED: not again, though no results
    assert len(fake_slurm.srun_log.read_text().splitlines()) == 2
    assert "job 1 COMPLETED but its results are not in --output-dir" in capsys.readouterr().out
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
    assert len(fake_slurm.srun_log.read_text().splitlines()) == (2 if again else 1)
    (job_file,) = (out / "slurm").glob("hpml-resnet18-w1-r1-*.job")
    assert job_file.read_text() == ("2\n" if again else "1\n")


@pytest.mark.parametrize("flags, message", [
    (["--where", "slurm", "--world-sizes", "6"], "--world-sizes 6 does not fill whole nodes of --gpus-per-node 4"),
    (["--where", "slurm", "--time-limit", "an hour"], "--time-limit must be a SLURM time"),
    (["--collect"], "--collect gathers the results of --where slurm jobs"),
])
def test_bad_slurm_flags_are_one_line(flags, message, tmp_path, capsys):
    assert exit_code_of(script_main("run_study.py"), [*flags, "--output-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


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
    assert [(fake_slurm.jobs / f"{job}.output").read_text() for job in (1, 2)] == [f"{cmd[1]}\n" for cmd in sbatch]
    arguments = (tmp_path / "srun.args").read_text().split("\0")
    assert arguments.count(str(out)) == 2 and not list(tmp_path.rglob("INJECTED"))


@pytest.mark.parametrize("bad", ["out\ntouch INJECTED #", "out\rx", "out\\x"])
def test_an_output_dir_sbatch_cannot_take_is_refused_in_one_line(bad, tmp_path, fake_slurm, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--where", "slurm", "--models", "resnet18", *FLAGS, "--output-dir", str(tmp_path / bad)]
    err = refusal(script_main("run_study.py"), argv, capsys)
    assert "--output-dir must not contain a newline, another control character or a backslash" in err
    assert repr(str(tmp_path / bad)) in err and not list(tmp_path.glob("out*")) and not fake_slurm.srun_log.exists()
