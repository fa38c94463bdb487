"""Files that travel are data, never code: pickled CIFAR-10 batches, a job's output archive, the source archive.

A data folder may come from anywhere, a job's output archive was written by whatever ran in the job, and the source
archive leaves this machine: each is read (or written) so that nothing in it runs, escapes its folder or is sent
by mistake. AWS is a local moto server, as in test_sagemaker.py.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import shlex
import signal
import sys
import tarfile
from pathlib import Path

import boto3
import pytest

import run_hpc
from hpml import data
from hpml.platforms.sagemaker import jobs
from hpml.scripts import sagemaker_submission
from tests import helpers
from tests.helpers import exit_code_of, no_aws_config, record, refusal, started_as

ROLE = "arn:aws:iam::123456789012:role/hpml-test"
BUCKET = "hpml-untrusted"


# ---- pickled batches -----------------------------------------------------------------------------------------------


class Calls:
    """Unpickled, calls `function(argument)`: what a crafted batch file does with plain pickle.load."""

    def __init__(self, function: object, argument: str) -> None:
        self.function, self.argument = function, argument

    def __reduce__(self) -> tuple:
        return self.function, (self.argument,)


CALLS = {"os.system": lambda marker: Calls(os.system, f"touch {marker}"),
         "builtins.exec": lambda marker: Calls(exec, f"open({str(marker)!r}, 'w').close()")}


def plant(batches_dir: Path, call: str, marker: Path) -> str:
    """Replace data_batch_1 by a batch whose data makes `call` create `marker`; the global it names."""
    batch = {b"data": CALLS[call](marker), b"labels": [0]}
    (batches_dir / data.BATCHES_FOLDER / "data_batch_1").write_bytes(pickle.dumps(batch))
    return f"{os.system.__module__}.system" if call == "os.system" else call


@pytest.mark.parametrize("call", CALLS)
def test_a_batch_that_calls_code_is_refused_in_one_line_and_nothing_runs(batches_dir, tmp_path, call):
    named = plant(batches_dir, call, tmp_path / "ran")
    with pytest.raises(data.UsageError) as refused:
        data.load_cifar10(batches_dir)
    message = str(refused.value)
    assert f"cannot read {batches_dir / data.BATCHES_FOLDER / 'data_batch_1'}: refused: it asks for {named}" in message
    assert "\n" not in message and not (tmp_path / "ran").exists()


def test_training_refuses_a_batch_that_calls_code(batches_dir, tmp_path, capsys):
    plant(batches_dir, "os.system", tmp_path / "ran")
    argv = ["--model", "resnet18", "--epochs", "1", "--data-dir", str(batches_dir), "--output-dir",
            str(tmp_path / "out"), "--quiet"]
    assert "refused: it asks for" in refusal(run_hpc.main, argv, capsys)
    assert not (tmp_path / "ran").exists()


def test_the_dry_runs_data_check_refuses_a_batch_that_calls_code(batches_dir, tmp_path, capsys, monkeypatch):
    no_aws_config(monkeypatch, tmp_path)
    plant(batches_dir, "builtins.exec", tmp_path / "ran")
    argv = ["submit", "--dry-run", "--model", "resnet18", "--data-dir", str(batches_dir)]
    assert "refused: it asks for builtins.exec" in refusal(sagemaker_submission.main, argv, capsys)
    assert not (tmp_path / "ran").exists()


# ---- a job's output archive ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def account(tmp_path_factory) -> boto3.Session:
    with helpers.moto_account(tmp_path_factory.mktemp("aws"), BUCKET) as session:
        yield session


def member(name: str, content: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(content)
    return info, content


def ended_job(session: boto3.Session, name: str, members: list[tuple]) -> None:
    """A job that has ended (moto's jobs end at once) with `members` packed where SageMaker puts its output."""
    session.client("sagemaker").create_training_job(
        TrainingJobName=name, RoleArn=ROLE, AlgorithmSpecification={"TrainingImage": "x", "TrainingInputMode": "File"},
        OutputDataConfig={"S3OutputPath": f"s3://{BUCKET}/hpml/output"}, StoppingCondition={"MaxRuntimeInSeconds": 60},
        ResourceConfig={"InstanceType": "ml.m5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 1})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, content in members:
            tar.addfile(info, io.BytesIO(content))
    session.client("s3").put_object(Bucket=BUCKET, Key=f"hpml/output/{name}/output/output.tar.gz",
                                    Body=buffer.getvalue())


def collect(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = exit_code_of(sagemaker_submission.main, ["collect", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def good_run(run_id: str = "r1") -> list[tuple]:
    return [member(f"results/{run_id}.json", json.dumps(record(run_id)).encode()),
            member(f"results/{run_id}.utilization.csv", b"time_s,gpu\n0,1\n")]


def test_collect_names_each_unsafe_member_and_writes_no_link(account, capsys, tmp_path):
    unsafe = [member("results/r1.extra", kind=tarfile.SYMTYPE, link="/etc/passwd"),
              member("results/r2.json", kind=tarfile.LNKTYPE, link="results/r1.json"),
              member("../escape.json", b"{}"), member("/tmp/absolute.json", b"{}"),
              member("results/../../up.json", b"{}"), member("results/pipe", kind=tarfile.FIFOTYPE)]
    ended_job(account, "hpml-unsafe", [*good_run(), *unsafe])
    code, out, err = collect(capsys, "hpml-unsafe", "--output-dir", str(tmp_path / "out"))
    assert code == 0, err
    for info, _ in unsafe:
        assert sum(f"archive member {info.name!r} skipped" in line for line in out.splitlines()) == 1, info.name
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["r1.json", "r1.utilization.csv"]
    assert not [path for path in (tmp_path / "out").iterdir() if path.is_symlink()]


@pytest.mark.parametrize(("bound", "limit", "members", "expected"), [
    ("MAX_OUTPUT_ARCHIVE_BYTES", 1000, [member("results/big.bin", os.urandom(4096))],
     "more than the 1,000 collect downloads"),
    ("MAX_EXPANDED_BYTES", 100_000, [member("results/big.bin", bytes(1 << 20))], "expands to more than 100,000 bytes"),
    ("MAX_ARCHIVE_MEMBERS", 3, [member(f"model/{i}") for i in range(3)], "holds more than 3 files"),
])
def test_collect_refuses_an_archive_past_its_bounds(account, capsys, tmp_path, monkeypatch, bound, limit, members,
                                                    expected):
    monkeypatch.setattr(jobs, bound, limit)
    name = f"hpml-bound-{bound.lower().replace('_', '-')}"
    ended_job(account, name, [*good_run(), *members])
    code, _, err = collect(capsys, name, "--output-dir", str(tmp_path / "out"))
    assert code == 1 and f"{name}: s3://{BUCKET}/hpml/output/{name}/output/output.tar.gz" in err
    assert expected in err and "nothing collected" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_collect_refuses_an_archive_holding_a_results_file_twice(account, capsys, tmp_path):
    ended_job(account, "hpml-twice", [*good_run(), member("results/r1.json", json.dumps(record("r1")).encode())])
    code, _, err = collect(capsys, "hpml-twice", "--output-dir", str(tmp_path / "out"))
    assert code == 1 and "holds 'results/r1.json' twice; nothing collected from it" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_sigterm_during_collect_leaves_no_scratch_folder_and_writes_nothing(account, tmp_path):
    ended_job(account, "hpml-sigterm", [*good_run(), member("results/big.bin", os.urandom(40 << 20))])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    command = [sys.executable, "sagemaker_submission.py", "collect", "hpml-sigterm", "--output-dir",
               str(tmp_path / "out")]
    code, _, err = helpers.signalled_when(command, {"TMPDIR": str(scratch)},
                                          lambda pid: bool(list(scratch.glob("hpml-collect-*/output.tar.gz"))),
                                          signal.SIGTERM, "the download")
    assert (code, err) == (143, "sagemaker_submission.py: terminated\n")
    assert not list(scratch.iterdir()) and not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize(("job", "content", "expected"), [
    ("hpml-not-json", b"{not json", "is not JSON"),
    ("hpml-no-fields", json.dumps({"run_id": "r2"}).encode(), "is not a valid results record"),
    ("hpml-run-id-out", json.dumps(record("../r2")).encode(), "../r2"),
    ("hpml-nan", json.dumps(record("r2", final_test_acc=float("nan"))).encode(), "is not a valid results record"),
])
def test_one_invalid_record_collects_nothing_of_its_job_and_exits_non_zero(account, capsys, tmp_path, job, content,
                                                                           expected):
    ended_job(account, job, [*good_run("r1"), member("results/r2.json", content)])
    ended_job(account, f"{job}-ok", good_run("r3"))
    code, _, err = collect(capsys, job, f"{job}-ok", "--output-dir", str(tmp_path / "out"))
    assert code == 1 and f"{job}: results/r2.json" in err and expected in err and err.count("\n") == 1, err
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["r3.json", "r3.utilization.csv"]


# ---- the source archive --------------------------------------------------------------------------------------------


@pytest.fixture
def source_tree(tmp_path, monkeypatch) -> Path:
    """The folder of the job's code packages, in the packages' layout with, inside hpml/, a link to a secret, a key,
    hidden files and a cache: the packages a job stages from now on."""
    repo = tmp_path / "site-packages"
    for name in ("hpml/__init__.py", "hpml/training/loop.py", "models/resnet.py"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("x = 1\n")
    secret = tmp_path / "home" / ".aws" / "credentials"
    secret.parent.mkdir(parents=True)
    secret.write_text("aws_secret_access_key = SECRET\n")
    (repo / "hpml" / "settings.py").symlink_to(secret)
    (repo / "hpml" / "aws").symlink_to(secret.parent)
    (repo / "hpml" / "key.pem").write_text("SECRET\n")
    (repo / "hpml" / ".env").write_text("SECRET=1\n")
    (repo / "models" / ".hidden").mkdir()
    (repo / "models" / ".hidden" / "copy.py").write_text("SECRET = 1\n")
    (repo / "hpml" / "__pycache__").mkdir()
    (repo / "hpml" / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"\0")
    monkeypatch.setattr(jobs, "CODE_PACKAGES", (repo / "hpml", repo / "models"))
    return repo


SOURCE_FILES = ["hpml/__init__.py", "hpml/training/loop.py", "models/resnet.py", "requirements.txt",
                "run_distributed.py", "run_hpc.py"]
LEFT_OUT = {"hpml/settings.py": "a link", "hpml/aws": "a link", "hpml/key.pem": "not a .py source file",
            "hpml/.env": "hidden", "models/.hidden": "hidden"}


def test_the_source_archive_holds_the_projects_source_files_only(source_tree, tmp_path):
    lines: list[str] = []
    staged = jobs.stage_source(tmp_path / "staged", ("tqdm>=4.64",), log=lines.append)
    assert [path.as_posix() for path in staged] == SOURCE_FILES
    assert "from hpml.scripts.run_hpc import run_as_script\n" in (tmp_path / "staged" / "run_hpc.py").read_text()
    assert sorted(lines) == sorted(f"code: {path} left out: {why}" + (", not followed" if why == "a link" else "")
                                   for path, why in LEFT_OUT.items())
    assert not [path for path in (tmp_path / "staged").rglob("*") if path.is_symlink()]


def test_the_dry_run_lists_the_code_it_would_upload(source_tree, tmp_path, capsys, monkeypatch):
    no_aws_config(monkeypatch, tmp_path)
    code = exit_code_of(sagemaker_submission.main, ["submit", "--dry-run", "--dataset", "synthetic"])
    out = capsys.readouterr().out
    assert code == 0
    assert ("code: 6 files (hpml/ (2 files), models/ (1 file), requirements.txt, run_distributed.py, run_hpc.py: "
            f"the hpml and models packages this client imports, from {source_tree}, and the entry scripts;") in out
    assert all(f"code: {path} left out" in out for path in LEFT_OUT)


def test_submit_uploads_no_link_secret_or_hidden_file(account, source_tree, capsys):
    argv = ["submit", "--dataset", "synthetic", "--region", "us-east-1", "--role", ROLE, "--bucket", BUCKET,
            "--job-name", "hpml-source"]
    assert exit_code_of(sagemaker_submission.main, argv) == 0, capsys.readouterr().err
    hyperparameters = account.client("sagemaker").describe_training_job(TrainingJobName="hpml-source")[
        "HyperParameters"]
    key = json.loads(hyperparameters["sagemaker_submit_directory"]).removeprefix(f"s3://{BUCKET}/")
    archive = account.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        assert sorted(info.name for info in tar if info.isfile()) == SOURCE_FILES
        assert not [info.name for info in tar if not (info.isfile() or info.isdir())]
        assert b"SECRET" not in b"".join(tar.extractfile(info).read() for info in tar if info.isfile())


# ---- generated commands --------------------------------------------------------------------------------------------


def test_the_printed_collect_command_quotes_every_value(capsys, monkeypatch):
    spec = jobs.JobSpec(job_name="hpml-quoted", instance_type="ml.p3.2xlarge", instance_count=1, distribution="none",
                        framework_version=jobs.DEFAULT_FRAMEWORK_VERSION, py_version=jobs.DEFAULT_PY_VERSION,
                        hyperparameters={}, region="us-east-1", role=ROLE, bucket=BUCKET, s3_data=None, spot=False,
                        max_run=3600, max_wait=None)
    profile = "my profile; rm -rf ~"
    for started, command in (("sagemaker_submission.py", ["python", "sagemaker_submission.py"]),
                             ("/venv/bin/hpml-sagemaker", ["hpml-sagemaker"])):
        started_as(monkeypatch, started)
        sagemaker_submission.print_submitted(spec, argparse.Namespace(wait=False, aws_profile=profile))
        (line,) = [line for line in capsys.readouterr().out.splitlines() if "when it has finished:" in line]
        argv = shlex.split(line.split("when it has finished: ", 1)[1])
        assert argv == [*command, "collect", "hpml-quoted", "--region", "us-east-1", "--aws-profile", profile]
        assert sagemaker_submission.build_parser().parse_args(argv[len(command):]).aws_profile == profile
