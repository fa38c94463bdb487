"""sagemaker_submission.py against a local moto server: the SDK and boto3 really talk HTTP to 127.0.0.1.

moto records training jobs but runs nothing: a job is "Completed" at once, with no billable time and no output,
so the tests put a results archive where SageMaker would upload the job's output, and cost figures from real
job descriptions are checked on their own (test_job_bill_*).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import numpy as np
import pytest

import run_hpc
import sagemaker_submission
from hpml import cli, config
from hpml.config import parse_model_list
from hpml.platforms.sagemaker import jobs, prices, submission
from tests import helpers
from tests.helpers import (
    REPO,
    exit_code_of,
    fake_images,
    no_aws_config,
    results_in,
    run_script,
    run_without_torch,
    started_as,
    write_npz,
)

ROLE = "arn:aws:iam::123456789012:role/hpml-test"
BUCKET = "hpml-test-bucket"
REGION = "us-east-1"
JOB_ARGS = ["--model", "resnet18", "--epochs", "3", "--batch-size", "64", "--lr", "0.05", "--optimizer", "sgd",
            "--seed", "7", "--quiet"]


# ---- a moto server and a shell pointed at it -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_account(tmp_path_factory) -> boto3.Session:
    """One moto account for this module, with dummy credentials and a bucket; the environment points the SDK and
    boto3 at it. Tests use their own job names, and compare before and after instead of expecting it empty."""
    with helpers.moto_account(tmp_path_factory.mktemp("aws"), BUCKET, REGION) as session:
        yield session


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the script in this process, as its __main__ does; (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = exit_code_of(sagemaker_submission.main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def submit(capsys, *argv: str) -> tuple[int, str, str]:
    return run(capsys, "submit", *JOB_ARGS, "--region", REGION, *argv)


def s3_keys(session: boto3.Session, bucket: str = BUCKET) -> list[str]:
    return [item["Key"] for item in session.client("s3").list_objects_v2(Bucket=bucket).get("Contents", [])]


def everything_in(session: boto3.Session) -> tuple[list[str], list[str]]:
    """The account's training jobs and S3 objects, to show that a refused command sent nothing."""
    buckets = [bucket["Name"] for bucket in session.client("s3").list_buckets()["Buckets"]]
    summaries = session.client("sagemaker").list_training_jobs(MaxResults=100)["TrainingJobSummaries"]
    return sorted(job["TrainingJobName"] for job in summaries), sorted(f"{b}/{key}" for b in buckets
                                                                  for key in s3_keys(session, b))


def describe(session: boto3.Session, job_name: str) -> dict:
    return session.client("sagemaker").describe_training_job(TrainingJobName=job_name)


def decoded(hyperparameters: dict) -> dict:
    """The hyperparameters as the job's script receives them (the SDK JSON-encodes each value)."""
    return {key: json.loads(value) for key, value in hyperparameters.items()}


# ---- submit --------------------------------------------------------------------------------------------------------

MAIN_JOB = "hpml-submit-test"
MAIN_JOB_ARGS = ["--instance-count", "2", "--bucket", BUCKET, "--role", ROLE, "--spot", "--max-run", "3600",
                 "--max-wait", "5400", "--schedule", "cosine", "--subset", "500", "--dist-timeout", "120",
                 "--scale-lr", "--job-name", MAIN_JOB, "--tensorboard"]


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cifar")
    for split, n, seed in (("train", 200, 1), ("test", 50, 2)):
        images, labels = fake_images(n, seed)
        np.savez(folder / f"{split}.npz", images=images, labels=labels)
    return folder


def moto_recorder(action: str) -> str:
    """Start, stop or download moto's recording of the requests its server receives."""
    url = f"{os.environ['AWS_ENDPOINT_URL']}/moto-api/recorder/{action}"
    with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=30) as response:
        return response.read().decode()


def sent_request(recording: str, operation: str) -> dict:
    """The body of the one request for a SageMaker operation in moto's recording (bodies of bytes in base64)."""
    (entry,) = [entry for entry in map(json.loads, recording.splitlines())
                if {key.lower(): value for key, value in entry["headers"].items()}.get("x-amz-target")
                == f"SageMaker.{operation}"]
    return json.loads(base64.b64decode(entry["body"]) if entry["body_encoded"] else entry["body"])


@pytest.fixture(scope="module")
def main_job(moto_account, cifar_dir, tmp_path_factory) -> dict:
    """A job submitted with a local data folder, spot, two instances, TensorBoard and a range of training flags, and
    the CreateTrainingJob request moto received (its recorder writes into the working folder)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(tmp_path_factory.mktemp("recording"))
        monkeypatch.setattr(sys, "stdout", io.StringIO())
        started_as(monkeypatch, "sagemaker_submission.py")
        moto_recorder("start-recording")
        code = exit_code_of(sagemaker_submission.main, ["submit", *JOB_ARGS, "--region", REGION, "--data-dir",
                                                         str(cifar_dir), *MAIN_JOB_ARGS])
        moto_recorder("stop-recording")
        request = sent_request(moto_recorder("download-recording"), "CreateTrainingJob")
        output = sys.stdout.getvalue()
    assert code == 0, output
    return {"output": output, "description": describe(moto_account, MAIN_JOB), "request": request}


def test_submit_prints_the_job_its_link_and_cost(main_job):
    assert f"submitted {MAIN_JOB}: ml.p4d.24xlarge × 2, smddp, PyTorch 2.2.0, spot" in main_job["output"]
    assert f"console.aws.amazon.com/sagemaker/home?region={REGION}#/jobs/{MAIN_JOB}" in main_job["output"]
    assert f"python sagemaker_submission.py collect {MAIN_JOB}" in main_job["output"]
    assert "cost: at most $75.38" in main_job["output"]  # 1 h × 2 × $37.688


def test_submit_sends_instances_spot_checkpoints_and_tags(moto_account, main_job):
    job = main_job["description"]
    assert job["ResourceConfig"]["InstanceType"] == "ml.p4d.24xlarge"
    assert job["ResourceConfig"]["InstanceCount"] == 2
    assert job["RoleArn"] == ROLE
    assert job["AlgorithmSpecification"]["TrainingImage"].endswith("/pytorch-training:2.2.0-gpu-py310")
    hyperparameters = decoded(job["HyperParameters"])
    assert hyperparameters["sagemaker_distributed_dataparallel_enabled"] is True
    assert hyperparameters["sagemaker_program"] == "run_distributed.py"
    assert job["EnableManagedSpotTraining"] is True
    assert job["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 5400}
    assert job["CheckpointConfig"] == {"S3Uri": f"s3://{BUCKET}/hpml/checkpoints/{MAIN_JOB}",
                                       "LocalPath": "/opt/ml/checkpoints"}
    assert job["OutputDataConfig"]["S3OutputPath"] == f"s3://{BUCKET}/hpml/output"
    assert jobs.SUITE_TAG in moto_account.client("sagemaker").list_tags(ResourceArn=job["TrainingJobArn"])["Tags"]


def test_submit_forwards_every_training_flag(main_job):
    hyperparameters = decoded(main_job["description"]["HyperParameters"])
    assert {key: hyperparameters[key] for key in ("model", "epochs", "batch-size", "lr", "optimizer", "seed",
                                                  "quiet", "schedule", "subset", "scale-lr")} == {
        "model": "resnet18", "epochs": "3", "batch-size": "64", "lr": "0.05", "optimizer": "sgd", "seed": "7",
        "quiet": "true", "schedule": "cosine", "subset": "500", "scale-lr": "true"}
    assert not {"data-dir", "output-dir", "checkpoint-dir"} & set(hyperparameters)
    # What SageMaker's training toolkit runs: run_distributed.py --name value ... for each hyperparameter.
    job_argv = [text for key, value in hyperparameters.items() if not key.startswith("sagemaker_")
                for text in (f"--{key}", value)]
    here = [*JOB_ARGS, *MAIN_JOB_ARGS[MAIN_JOB_ARGS.index("--schedule"):MAIN_JOB_ARGS.index("--job-name")]]
    in_job, locally = (cli.config_from_args(parser_of_run_distributed().parse_args(argv)) for argv in (job_argv, here))
    assert in_job.as_dict() == {**locally.as_dict(), "tensorboard": config.JOB_TENSORBOARD_DIR}
    assert in_job.schedule == "cosine" and in_job.subset == 500 and in_job.scale_lr is True


def parser_of_run_distributed() -> cli.ArgumentParser:
    parser = cli.ArgumentParser()
    cli.add_training_args(parser)
    cli.add_distributed_args(parser)
    return parser


def test_submit_uploads_the_data_and_only_the_code(moto_account, main_job):
    (channel,) = main_job["description"]["InputDataConfig"]
    assert channel["ChannelName"] == "training"
    data_prefix = channel["DataSource"]["S3DataSource"]["S3Uri"].removeprefix(f"s3://{BUCKET}/")
    assert data_prefix.startswith("hpml/data/cifar10-")
    assert sorted(key.removeprefix(data_prefix) for key in s3_keys(moto_account) if key.startswith(data_prefix)) == [
        "test.npz", "train.npz"]
    hyperparameters = decoded(main_job["description"]["HyperParameters"])
    source_key = hyperparameters["sagemaker_submit_directory"].removeprefix(f"s3://{BUCKET}/")
    archive = moto_account.client("s3").get_object(Bucket=BUCKET, Key=source_key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        names, members = tar.getnames(), tar.getmembers()
        requirements = tar.extractfile("requirements.txt").read().decode()
    assert {"run_distributed.py", "run_hpc.py", "hpml/cli.py", "hpml/training/loop.py",
            "models/resnet.py"} <= set(names)
    assert not [name for name in names if name.split("/")[0] in ("tests", "results", "data", ".git", ".venv")]
    assert not [name for name in names if "__pycache__" in name]
    assert [info.name for info in members if info.isfile() and not info.name.endswith(".py")] == ["requirements.txt"]
    assert not [info.name for info in members if not (info.isfile() or info.isdir())]  # no links
    assert "tqdm" in requirements and "tensorboard" in requirements  # the job writes TensorBoard
    assert not [line for line in requirements.splitlines()
                                           if re.match(r"(torch|torchvision|numpy)\b", line)]


def test_second_submit_does_not_upload_the_same_data_again(moto_account, capsys, main_job, cifar_dir):
    before = {item["Key"]: item["LastModified"] for item in
              moto_account.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="hpml/data/")["Contents"]}
    code, out, err = submit(capsys, "--data-dir", str(cifar_dir), "--bucket", BUCKET, "--role", ROLE,
                            "--job-name", "hpml-second")
    assert code == 0, err
    assert "not uploaded again" in out
    after = {item["Key"]: item["LastModified"] for item in
             moto_account.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="hpml/data/")["Contents"]}
    assert after == before
    assert describe(moto_account, "hpml-second")["InputDataConfig"] == main_job["description"]["InputDataConfig"]


def test_submit_sends_metric_definitions_and_has_sagemaker_upload_tensorboard(main_job, torchrun_job):
    assert main_job["request"]["AlgorithmSpecification"]["MetricDefinitions"] == jobs.metric_definitions(["resnet18"])
    tensorboard = {"S3OutputPath": f"s3://{BUCKET}/hpml/tensorboard/{MAIN_JOB}/",
                   "LocalPath": config.JOB_TENSORBOARD_DIR}
    assert main_job["request"]["TensorBoardOutputConfig"] == main_job["description"]["TensorBoardOutputConfig"] == \
        tensorboard
    assert decoded(main_job["description"]["HyperParameters"])["tensorboard"] == "/opt/ml/output/tensorboard"
    assert "TensorBoardOutputConfig" not in torchrun_job and "tensorboard" not in torchrun_job["HyperParameters"]


PRINTED = {"epoch_time_s": ".1f", "images_per_s": ".0f"}  # the other metrics with four decimals (train.format_epoch)


def test_each_metric_definition_reads_its_models_values_from_what_a_quiet_job_prints(tmp_path, monkeypatch, capsys):
    base = tmp_path / "opt-ml"
    for name, value in {"SAGEMAKER_BASE_DIR": base, "SM_TRAINING_ENV": "{}", "SM_MODEL_DIR": base / "model",
                        "SM_OUTPUT_DATA_DIR": base / "output" / "data"}.items():
        monkeypatch.setenv(name, str(value))
    argv = ["--model", "shufflenet,mobilenet", "--data-dir", str(write_npz(tmp_path / "data", train=20, test=10)),
            "--batch-size", "10", "--epochs", "2", "--workers", "0", "--device", "cpu", "--quiet"]
    capsys.readouterr()
    assert exit_code_of(run_hpc.main, argv) == 0
    printed = capsys.readouterr().out
    records = {record["model"]: record for record in results_in(base / "output" / "data" / "results")}
    definitions = jobs.metric_definitions(list(records))
    assert len(definitions) == 2 * len(jobs.METRICS)
    for definition in definitions:
        model, metric = definition["Name"].split(":")
        assert [float(value) for value in re.findall(definition["Regex"], printed)] == [
            float(format(epoch[metric], PRINTED.get(metric, ".4f"))) for epoch in records[model]["epochs"]], model


def test_metric_definitions_of_every_model_fit_sagemakers_limits():
    definitions = jobs.metric_definitions(parse_model_list("all"))
    assert len(definitions) <= 40 and len({definition["Name"] for definition in definitions}) == len(definitions)
    for definition in definitions:
        assert len(definition["Name"]) <= 255 and len(definition["Regex"]) <= 500
        assert re.compile(definition["Regex"]).groups == 1  # SageMaker takes the first group's match as the value


@pytest.fixture(scope="module")
def torchrun_job(moto_account) -> dict:
    """A torchrun job on the synthetic data set, its role from $HPML_SAGEMAKER_ROLE, without --bucket."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("HPML_SAGEMAKER_ROLE", ROLE)
        monkeypatch.setattr(sys, "stdout", io.StringIO())
        code = exit_code_of(sagemaker_submission.main, [
            "submit", *JOB_ARGS, "--region", REGION, "--dataset", "synthetic", "--distribution", "torchrun",
            "--instance-type", "ml.g5.12xlarge", "--job-name", "hpml-torchrun"])
        output = sys.stdout.getvalue()
    assert code == 0, output
    return describe(moto_account, "hpml-torchrun")


def test_torchrun_job_without_bucket_or_role_flags(moto_account, torchrun_job):
    hyperparameters = decoded(torchrun_job["HyperParameters"])
    assert hyperparameters["sagemaker_torch_distributed_enabled"] is True
    assert "sagemaker_distributed_dataparallel_enabled" not in hyperparameters
    assert torchrun_job["RoleArn"] == ROLE
    assert "InputDataConfig" not in torchrun_job  # the synthetic set is made inside the job
    default_bucket = "sagemaker-us-east-1-123456789012"  # moto's account
    assert torchrun_job["OutputDataConfig"]["S3OutputPath"] == f"s3://{default_bucket}/hpml/output"
    assert [key for key in s3_keys(moto_account, default_bucket) if key.endswith("sourcedir.tar.gz")]


def test_a_single_gpu_baseline_job_runs_the_single_device_script(moto_account, capsys):
    code, _, err = submit(capsys, "--dataset", "synthetic", "--distribution", "none", "--instance-type",
                            "ml.p3.2xlarge", "--role", ROLE, "--bucket", BUCKET, "--job-name", "hpml-baseline")
    assert code == 0, err
    hyperparameters = decoded(describe(moto_account, "hpml-baseline")["HyperParameters"])
    assert hyperparameters["sagemaker_program"] == "run_hpc.py"
    assert not {"backend", "dist-timeout", "scale-lr"} & set(hyperparameters)  # flags run_hpc.py does not take
    assert "sagemaker_distributed_dataparallel_enabled" not in hyperparameters


@pytest.mark.parametrize(("flags", "expected"), [
    (["--instance-type", "ml.g5.xlarge"], "SMDDP does not run on ml.g5.xlarge; supported instance types: "
                                          "ml.p3.16xlarge, ml.p3dn.24xlarge, ml.p4d.24xlarge, ml.p4de.24xlarge"),
    (["--framework-version", "2.3.0"], "SMDDP does not support PyTorch 2.3.0; supported --framework-version:"),
    (["--py-version", "py39"], "py39"),
    (["--instance-count", "0"], "--instance-count must be 1 or more, got 0"),
    (["--distribution", "none", "--instance-count", "2"], "--distribution none trains on one instance"),
    (["--s3-data", "s3://Not_A_Bucket/cifar10"], "--s3-data must be an S3 location like s3://my-bucket/cifar10/, "
                                                 "got 's3://Not_A_Bucket/cifar10'"),
    (["--s3-data", "https://example.com/cifar10"], "got 'https://example.com/cifar10'"),
    (["--s3-data", f"s3://{BUCKET}/empty/"], f"--s3-data s3://{BUCKET}/empty/: no files there"),
    (["--model", "resnet99"], "unknown model 'resnet99'"),
    (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    (["--role", "hpml-role"], "--role must be an IAM role ARN"),
    (["--bucket", "Bad_Bucket"], "--bucket must be an S3 bucket name"),
    (["--bucket", "no-such-bucket-here"], "--bucket no-such-bucket-here: no such bucket"),
    (["--max-wait", "9000"], "--max-wait applies to spot jobs only"),
    (["--spot", "--max-run", "3600", "--max-wait", "60"], "--max-wait must be at least --max-run (3600), got 60"),
    (["--backend", "gloo"], "--backend gloo does not work with --distribution smddp"),
    (["--job-name", "no_underscores"], "--job-name must be"),
    (["--checkpoint-dir", "/tmp/ckpt"], "--checkpoint-dir /tmp/ckpt: a SageMaker job keeps its checkpoints in "
                                        "/opt/ml/checkpoints"),
    (["--distribution", "torchrun", "--instance-type", "ml.m5.xlarge"], "torch_distributed is supported only for GPU"),
    (["--distribution", "torchrun", "--backend", "smddp", "--instance-type", "ml.g5.12xlarge"],
     "SMDDP does not run on ml.g5.12xlarge"),
    (["--distribution", "none", "--instance-type", "ml.p3.2xlarge", "--backend", "nccl"],
     "--backend nccl does not work with --distribution none; use one of auto"),
    (["--distribution", "none", "--instance-type", "ml.p3.2xlarge", "--scale-lr"],
     "--scale-lr applies to data-parallel runs; --distribution none runs run_hpc.py"),
    (["--distribution", "none", "--instance-type", "ml.p3.2xlarge", "--grad-compression", "fp16"],
     "--grad-compression applies to data-parallel runs; --distribution none runs run_hpc.py"),
    (["--grad-compression", "powersgd"], "--grad-compression powersgd is not available with the smddp backend"),
    (["--data-dir", "/nonexistent/cifar"], "no CIFAR-10 folder at /nonexistent/cifar"),
    (["--aws-profile", "nosuchprofile"], "nosuchprofile"),
])
def test_bad_input_is_one_line_and_sends_nothing(moto_account, capsys, flags, expected):
    before = everything_in(moto_account)
    base = {"--role": ROLE, "--bucket": BUCKET, "--s3-data": f"s3://{BUCKET}/hpml/"}
    for flag in flags:
        base.pop(flag, None)
    if "--data-dir" in flags:
        base.pop("--s3-data")
    code, _, err = submit(capsys, *[text for pair in base.items() for text in pair], *flags)
    assert code == 2
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert everything_in(moto_account) == before


def test_missing_role_is_one_line_and_sends_nothing(moto_account, capsys):
    before = everything_in(moto_account)
    code, _, err = submit(capsys, "--dataset", "synthetic", "--bucket", BUCKET)
    assert code == 2 and err.count("\n") == 1
    assert "no IAM role for the job: pass --role" in err and "HPML_SAGEMAKER_ROLE" in err
    assert everything_in(moto_account) == before


def test_no_credentials_is_one_line_and_sends_nothing(moto_account, capsys, monkeypatch):
    before = everything_in(moto_account)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    code, _, err = submit(capsys, "--dataset", "synthetic", "--bucket", BUCKET, "--role", ROLE)
    assert code == 2 and err.count("\n") == 1
    assert "no AWS credentials found" in err and "aws configure" in err and "--aws-profile" in err
    monkeypatch.undo()
    assert everything_in(moto_account) == before


# ---- the dry run ---------------------------------------------------------------------------------------------------


class ConnectionCounter:
    """A TCP listener on 127.0.0.1 that counts the connections made to it."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.count = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.count += 1
            connection.close()


def test_dry_run_needs_no_credentials_and_connects_nowhere(tmp_path, monkeypatch):
    no_aws_config(monkeypatch, tmp_path)
    counter = ConnectionCounter()
    env = {**os.environ, "AWS_ENDPOINT_URL": counter.url, "AWS_EC2_METADATA_SERVICE_ENDPOINT": counter.url}
    del env["AWS_EC2_METADATA_DISABLED"]  # an instance-metadata probe would reach the counter
    done = run_script("sagemaker_submission.py", "submit", "--dry-run", "--model", "resnet18", "--instance-count",
                      "2", env=env, timeout=120)
    counter.server.close()
    assert done.returncode == 0, done.stderr
    assert counter.count == 0
    request = json.loads(done.stdout[done.stdout.index("{"):done.stdout.index("\nNotes:")])
    assert request["ResourceConfig"]["InstanceCount"] == 2
    assert request["ResourceConfig"]["InstanceType"] == "ml.p4d.24xlarge"
    assert request["AlgorithmSpecification"]["TrainingImage"].endswith("pytorch-training:2.2.0-gpu-py310")
    assert json.loads(request["HyperParameters"]["sagemaker_distributed_dataparallel_enabled"]) is True
    assert json.loads(request["HyperParameters"]["model"]) == "resnet18"
    assert request["CheckpointConfig"]["LocalPath"] == "/opt/ml/checkpoints"
    assert "role: none given yet" in done.stdout and "region: none configured" in done.stdout
    assert "cost: at most $150.75" in done.stdout  # 2 h × 2 × $37.688


def test_dry_run_prints_what_submit_sends(moto_account, capsys, main_job, cifar_dir):
    before = everything_in(moto_account)
    code, out, err = submit(capsys, "--data-dir", str(cifar_dir), *MAIN_JOB_ARGS, "--dry-run")
    assert code == 0, err
    assert everything_in(moto_account) == before
    request = json.loads(out[out.index("{"):out.index("\nNotes:")])
    sent = main_job["description"]
    for field in ("HyperParameters", "ResourceConfig", "InputDataConfig", "OutputDataConfig", "StoppingCondition",
                  "CheckpointConfig", "RoleArn", "EnableManagedSpotTraining", "TensorBoardOutputConfig"):
        assert sent[field] == request[field], field
    assert sent["AlgorithmSpecification"]["TrainingImage"] == request["AlgorithmSpecification"]["TrainingImage"]
    assert main_job["request"]["AlgorithmSpecification"] == request["AlgorithmSpecification"]
    assert "data: 2 files" in out and "cost: at most $75.38" in out


def test_dry_run_defines_each_models_metrics(capsys):
    code, out, err = submit(capsys, "--model", "resnet18,vgg", "--dataset", "synthetic", "--dry-run")
    assert code == 0, err
    request = json.loads(out[out.index("{"):out.index("\nNotes:")])
    assert [definition["Name"] for definition in request["AlgorithmSpecification"]["MetricDefinitions"]] == [
        f"{model}:{metric}" for model in ("resnet18", "vgg16") for metric in jobs.METRICS]
    assert "TensorBoardOutputConfig" not in request and "tensorboard" not in request["HyperParameters"]
    assert "metrics: train_loss, train_acc, test_loss, test_acc, epoch_time_s, images_per_s of each model" in out


# ---- collect and list ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_record(tmp_path_factory) -> dict:
    """A real results record from a short run_hpc.py run on a tiny npz set (10 train / 10 test images)."""
    out = tmp_path_factory.mktemp("run")
    folder = write_npz(tmp_path_factory.mktemp("data"), train=10, test=10)
    done = run_script("run_hpc.py", "--model", "mobilenetv2", "--data-dir", str(folder), "--batch-size", "10",
                      "--epochs", "1", "--workers", "0", "--quiet", "--output-dir", str(out))
    assert done.returncode == 0, done.stderr
    (record,) = results_in(out)
    return record


def put_job_output(session: boto3.Session, bucket: str, job_name: str, files: dict[str, bytes]) -> None:
    """Pack files as SageMaker packs the job's output folder, and put them where it uploads them."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    session.client("s3").put_object(Bucket=bucket, Key=f"hpml/output/{job_name}/output/output.tar.gz",
                                    Body=buffer.getvalue())


def test_collect_brings_results_home_once(moto_account, capsys, main_job, torchrun_job, run_record, tmp_path):
    record = {**run_record, "sagemaker": {"job_name": MAIN_JOB, "current_host": "algo-1", "gpus_per_host": 8}}
    run_id = record["run_id"]
    monitor = b"time_s,gpu,util_percent\n0.0,0,97\n"
    put_job_output(moto_account, BUCKET, MAIN_JOB, {
        f"results/{run_id}.json": json.dumps(record).encode(),
        f"results/{run_id}.utilization.csv": monitor,
        f"results/{run_id}.rank0.trace.json": b'{"traceEvents": []}',  # --profile's: JSON, but no record
        "results/notes.txt": b"not a result",
        "model/ignored.json": b"{}",
    })
    out_dir = tmp_path / "results"
    code, out, err = run(capsys, "collect", MAIN_JOB, "--output-dir", str(out_dir))
    assert code == 0, err
    assert "results/notes.txt skipped" in out
    assert sorted(path.name for path in out_dir.iterdir()) == [f"{run_id}.json", f"{run_id}.rank0.trace.json",
                                                                f"{run_id}.utilization.csv"]
    assert (out_dir / f"{run_id}.utilization.csv").read_bytes() == monitor
    collected = json.loads((out_dir / f"{run_id}.json").read_text())
    assert collected["epochs"] == run_record["epochs"] and collected["run_id"] == run_id
    job = collected["sagemaker"]
    assert job["job_name"] == MAIN_JOB and job["current_host"] == "algo-1"  # what the job wrote is kept
    assert job["instance_type"] == "ml.p4d.24xlarge" and job["instance_count"] == 2 and job["spot"] is True
    assert job["status"] == "Completed" and job["region"] == REGION and job["runs_in_job"] == 1
    assert job["price_per_instance_hour_usd"] == 37.688 and job["price_source"] == prices.PRICE_SOURCE
    # moto reports no billable time, so there is no cost rather than a made-up one
    assert job["billable_time_s"] is None and job["job_cost_usd"] is None and job["cost_usd"] is None
    assert job["cost_share"] == 1
    assert "reported no billable time" in out

    before = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in out_dir.iterdir()}
    code, out, _ = run(capsys, "collect", MAIN_JOB, "--output-dir", str(out_dir))
    assert code == 0 and f"{run_id} is already in" in out
    code, out, _ = run(capsys, "collect", "--all", "--output-dir", str(out_dir))
    assert code == 0 and "(1 already in" in out and MAIN_JOB not in out
    assert "hpml-torchrun: Completed, but s3://sagemaker-us-east-1-123456789012/hpml/output/hpml-torchrun/output/" \
           "output.tar.gz does not exist" in out
    assert {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in out_dir.iterdir()} == before


def test_each_run_of_a_job_gets_its_share_of_the_bill(moto_account, main_job, run_record, tmp_path):
    """A job that trained two models one after another: each record's cost_usd is its share of the job's bill, by
    wall time; equal shares when a run has no wall time."""
    runs = [{**run_record, "run_id": "first", "total_wall_time_s": 30.0},
            {**run_record, "run_id": "second", "model": "resnet18", "total_wall_time_s": 90.0}]
    put_job_output(moto_account, BUCKET, MAIN_JOB, {f"results/{run['run_id']}.json": json.dumps(run).encode()
                                                    for run in runs})
    finished = {**describe(moto_account, MAIN_JOB), "BillableTimeInSeconds": 600}  # moto reports none
    bill = 600 * 2 * 37.688 / 3600
    jobs.collect_job(moto_account, finished, tmp_path / "by-time", log=lambda line: None)
    costs = {record["run_id"]: record["sagemaker"] for record in results_in(tmp_path / "by-time")}
    assert costs["first"]["job_cost_usd"] == pytest.approx(bill) and costs["first"]["runs_in_job"] == 2
    assert costs["first"]["cost_usd"] + costs["second"]["cost_usd"] == pytest.approx(bill)
    assert (costs["first"]["cost_share"], costs["second"]["cost_usd"]) == pytest.approx((0.25, 0.75 * bill))

    del runs[1]["total_wall_time_s"]
    put_job_output(moto_account, BUCKET, MAIN_JOB, {f"results/{run['run_id']}.json": json.dumps(run).encode()
                                                    for run in runs})
    jobs.collect_job(moto_account, finished, tmp_path / "equal", log=lambda line: None)
    assert [record["sagemaker"]["cost_usd"] for record in results_in(tmp_path / "equal")] == pytest.approx(
        [bill / 2, bill / 2])


def test_a_cut_output_archive_is_one_line_and_writes_nothing(moto_account, capsys, main_job, run_record, tmp_path):
    put_job_output(moto_account, BUCKET, MAIN_JOB, {f"results/{run_record['run_id']}.json":
                                                    json.dumps(run_record).encode() * 50})
    key = f"hpml/output/{MAIN_JOB}/output/output.tar.gz"
    s3 = moto_account.client("s3")
    whole = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    s3.put_object(Bucket=BUCKET, Key=key, Body=whole[:len(whole) // 2])  # an upload cut half way
    code, _, err = run(capsys, "collect", MAIN_JOB, "--output-dir", str(tmp_path / "r"))
    assert code == 1 and f"{MAIN_JOB}: s3://{BUCKET}/{key} is cut short or corrupt" in err
    assert err.count("\n") == 1 and "Traceback" not in err and not results_in(tmp_path / "r")


def test_submit_collect_and_plot_run_without_torch(moto_account, main_job, run_record, tmp_path):
    """The laptop client: hpml[client] has no torch, so neither may these commands need it."""
    put_job_output(moto_account, BUCKET, MAIN_JOB, {f"results/{run_record['run_id']}.json":
                                                    json.dumps(run_record).encode()})
    commands = [
        ("sagemaker_submission.py", "submit", "--dry-run", "--region", REGION, "--model", "resnet,densenet",
         "--dataset", "synthetic", "--epochs", "3"),
        ("sagemaker_submission.py", "collect", MAIN_JOB, "--region", REGION, "--output-dir", str(tmp_path / "r")),
        ("sagemaker_submission.py", "list", "--region", REGION),
        ("plot_hpml.py", "--results-dir", str(tmp_path / "r"), "--output-dir", str(tmp_path / "img")),
    ]
    for script, *args in commands:
        done = run_without_torch(script, *args)
        assert done.returncode == 0, (args, done.stderr)
    assert (tmp_path / "img" / "Time.png").is_file() and len(results_in(tmp_path / "r")) == 1
    refused = run_without_torch("sagemaker_submission.py", "submit", "--dry-run", "--model", "lenet")
    assert refused.returncode == 2 and "unknown model 'lenet'" in refused.stderr  # flag checks need no torch


def test_collect_of_unknown_job_is_one_line(moto_account, capsys, tmp_path):
    code, _, err = run(capsys, "collect", "hpml-nope", "--output-dir", str(tmp_path))
    assert code == 2 and "no training job named 'hpml-nope'" in err and err.count("\n") == 1


def test_list_shows_this_suites_jobs(moto_account, capsys, main_job, torchrun_job):
    moto_account.client("sagemaker").create_training_job(  # a job of someone else, without the suite's tag
        TrainingJobName="other-job", RoleArn=ROLE,
        AlgorithmSpecification={"TrainingImage": "x", "TrainingInputMode": "File"},
        OutputDataConfig={"S3OutputPath": f"s3://{BUCKET}/other"}, StoppingCondition={"MaxRuntimeInSeconds": 60},
        ResourceConfig={"InstanceType": "ml.m5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 1})
    code, out, err = run(capsys, "list", "--json")
    assert code == 0, err
    rows = {row["job_name"]: row for row in json.loads(out)}
    assert "other-job" not in rows
    assert {key: rows[MAIN_JOB][key] for key in ("status", "model", "instance_type", "instance_count", "spot")} == {
        "status": "Completed", "model": "resnet18", "instance_type": "ml.p4d.24xlarge", "instance_count": 2,
        "spot": True}
    assert rows["hpml-torchrun"]["instance_type"] == "ml.g5.12xlarge"
    code, out, _ = run(capsys, "list", "--limit", "50")
    assert code == 0 and MAIN_JOB in out and "ml.p4d.24xlarge × 2 spot" in out and "other-job" not in out
    assert out.splitlines()[0].split() == ["JOB", "STATUS", "MODEL", "INSTANCES", "CREATED", "DURATION", "BILLABLE",
                                           "COST"]


def test_wait_streams_the_logs_then_collects(moto_account, capsys, run_record, tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "LOG_POLL_S", 0.1)  # moto's job has ended at once: no wait for late log lines
    logs, group, stream = moto_account.client("logs"), "/aws/sagemaker/TrainingJobs", "hpml-wait/algo-1-1700000000"
    logs.create_log_group(logGroupName=group)
    logs.create_log_stream(logGroupName=group, logStreamName=stream)
    logs.put_log_events(logGroupName=group, logStreamName=stream,
                        logEvents=[{"timestamp": int(time.time() * 1000), "message": "epoch 1/1 test acc 0.4200"}])
    put_job_output(moto_account, BUCKET, "hpml-wait",
                   {f"results/{run_record['run_id']}.json": json.dumps(run_record).encode()})
    code, out, err = submit(capsys, "--dataset", "synthetic", "--bucket", BUCKET, "--role", ROLE,
                            "--job-name", "hpml-wait", "--wait", "--output-dir", str(tmp_path / "r"))
    assert code == 0, err
    assert "epoch 1/1 test acc 0.4200" in out
    assert out.index("epoch 1/1") < out.index("hpml-wait: Completed")
    assert [record["run_id"] for record in results_in(tmp_path / "r")] == [run_record["run_id"]]


# ---- cost, versions, imports ---------------------------------------------------------------------------------------


def test_cost_is_billable_seconds_times_count_times_price():
    assert prices.cost_usd(3600, 2, 37.688) == pytest.approx(75.376)
    assert prices.cost_usd(90, 1, 3.825) == pytest.approx(0.095625)


def test_job_bill_of_a_finished_spot_job():
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    description = {"TrainingJobStatus": "Completed", "EnableManagedSpotTraining": True,
                   "ResourceConfig": {"InstanceType": "ml.p4d.24xlarge", "InstanceCount": 2},
                   "TrainingTimeInSeconds": 1000, "BillableTimeInSeconds": 300, "TrainingStartTime": start,
                   "TrainingEndTime": start + timedelta(seconds=1000)}
    bill = prices.job_bill(description)
    assert bill["cost_usd"] == pytest.approx(300 * 2 * 37.688 / 3600)
    assert bill["spot_savings_percent"] == pytest.approx(70)
    assert bill["estimated_cost_usd"] is None and bill["price_source"] == prices.PRICE_SOURCE
    text = submission.bill_text(bill)
    assert "300 s billable × 2 at $37.688/h on demand = $6.28" in text and "managed spot saved 70%" in text


def test_job_bill_of_a_running_job_and_of_an_unpriced_instance():
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    running = {"TrainingJobStatus": "InProgress", "TrainingStartTime": start,
               "ResourceConfig": {"InstanceType": "ml.p3.16xlarge", "InstanceCount": 4}}
    bill = prices.job_bill(running, now=start + timedelta(minutes=30))
    assert bill["cost_usd"] is None and bill["estimated_cost_usd"] == pytest.approx(0.5 * 4 * 28.152)
    unpriced = {**running, "ResourceConfig": {"InstanceType": "ml.p4de.24xlarge", "InstanceCount": 1}}
    assert prices.job_bill(unpriced, now=start + timedelta(minutes=30))["estimated_cost_usd"] is None


def test_defaults_are_what_the_pinned_sdk_offers_smddp_for():
    sdk = jobs.sdk()
    assert sdk.__version__.startswith("2.")
    assert jobs.DEFAULT_FRAMEWORK_VERSION in sdk.fw_utils.SM_DATAPARALLEL_SUPPORTED_FRAMEWORK_VERSIONS["pytorch"]
    assert "ml.p4d.24xlarge" in sdk.fw_utils.SM_DATAPARALLEL_SUPPORTED_INSTANCE_TYPES
    image = sdk.image_uris.retrieve("pytorch", region=REGION, version=jobs.DEFAULT_FRAMEWORK_VERSION,
                                    py_version=jobs.DEFAULT_PY_VERSION, instance_type="ml.p4d.24xlarge",
                                    image_scope="training")
    assert image.endswith(f"pytorch-training:{jobs.DEFAULT_FRAMEWORK_VERSION}-gpu-{jobs.DEFAULT_PY_VERSION}")


def test_the_sdk_checks_each_config_against_its_schema_once():
    validate = jobs.sdk().utils.validate_sagemaker_config
    validate(jobs.TELEMETRY_OFF)
    validate(jobs.TELEMETRY_OFF)
    assert validate.accepted == {json.dumps(jobs.TELEMETRY_OFF, sort_keys=True)}
    with pytest.raises(Exception, match="is not of type 'boolean'"):  # a config it has not seen is still checked
        validate({"SchemaVersion": "1.0", "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": "maybe"}}}})


def test_the_sdk_still_checks_its_config_through_the_function_checked_once(capsys, monkeypatch):
    """jobs._validate_each_config_once replaces sagemaker.utils.validate_sagemaker_config, the SDK's one internal
    that the client patches (no option turns its repeated checks off). The day the SDK checks its config some other
    way, this fails: the patch does nothing any more and should go."""
    utils = jobs.sdk().utils
    patched, seen = utils.validate_sagemaker_config, []

    def counting(config: dict) -> None:
        seen.append(config)
        patched(config)

    counting.accepted = patched.accepted  # so that jobs.sdk() keeps it as the patched check
    monkeypatch.setattr(utils, "validate_sagemaker_config", counting)
    code, _, err = submit(capsys, "--dataset", "synthetic", "--dry-run")
    assert code == 0, err
    assert len(seen) >= 5 and all(config == jobs.TELEMETRY_OFF for config in seen)


def test_only_the_submission_script_loads_the_sdk():
    """The training, study and plotting scripts, and every module but the SageMaker client's (jobs, submission),
    never import the SageMaker SDK or boto3; the submission script imports the SDK only when a command needs it."""
    scripts = [path.stem for path in REPO.glob("*.py") if path.stem != "sagemaker_submission"]
    code = (f"import sys, importlib\nfor name in {scripts!r}: importlib.import_module(name)\n"
            "import hpml, pkgutil\n"
            "for module in pkgutil.iter_modules(hpml.__path__):\n"
            "    module.name not in ('jobs', 'submission') and importlib.import_module('hpml.' + module.name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sagemaker', 'boto3', 'botocore')))\n"
            "import sagemaker_submission\n"
            "print('sagemaker' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "False"]


@pytest.mark.parametrize("command", ["submit", "collect", "list"])
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as done:
        sagemaker_submission.main([command, "--help"])
    assert done.value.code == 0
    assert "--region" in capsys.readouterr().out
