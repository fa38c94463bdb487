"""run_study.py --where sagemaker against a local moto server: the plan, its GPUs and costs, submitting, retrying and
collecting.

moto records training jobs but runs nothing: a job is "Completed" at once, and it has no call that fails or stops
one, so `end_job` sets the status in the server's own store, as SageMaker would when a job ends so.
"""

from __future__ import annotations

import io
import json
import re
import sys
import tarfile

import boto3
import pytest
from moto.sagemaker.models import sagemaker_backends

from hpml import jobs, sagemaker_plan
from hpml.config import MAX_REPEATS
from hpml.study import Cell
from tests.helpers import exit_code_of, moto_account, no_aws_config, record, results_in, script_main

ROLE = "arn:aws:iam::123456789012:role/hpml-test"
BUCKET = "hpml-study"
SAGEMAKER = ["--where", "sagemaker", "--models", "shufflenetv2", "--world-sizes", "1,8", "--dataset", "synthetic",
             "--epochs", "2", "--region", "us-east-1"]


def study(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """Run run_study.py's main in this process; (exit code, stdout)."""
    capsys.readouterr()
    code = exit_code_of(script_main("run_study.py"), [*SAGEMAKER, *argv])
    return code, capsys.readouterr().out


def submitting(tmp_path, *argv: str) -> list[str]:
    return ["--role", ROLE, "--bucket", BUCKET, "--output-dir", str(tmp_path / "out"), "--figures-dir",
            str(tmp_path / "fig"), *argv]


def job_names(session: boto3.Session) -> list[str]:
    return sorted(job["TrainingJobName"] for job in jobs.suite_jobs(session))


def end_job(name: str, status: str, reason: str | None = None) -> None:
    """Make moto's (completed) job have ended with `status`, as a failed or stopped SageMaker job has."""
    job = sagemaker_backends["123456789012"]["us-east-1"].training_jobs[name]
    job.training_job_status, job.failure_reason = status, reason


def put_results(session: boto3.Session, job_name: str, run_id: str) -> None:
    """A results record where SageMaker uploads the job's output."""
    buffer = io.BytesIO()
    content = json.dumps(record(run_id, model="shufflenetv2")).encode()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo(f"results/{run_id}.json")
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    session.client("s3").put_object(Bucket=BUCKET, Key=f"hpml/output/{job_name}/output/output.tar.gz",
                                    Body=buffer.getvalue())


# ---- the plan: one GPU model, shown ----------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_with_gpus_and_costs_and_sends_nothing(tmp_path, monkeypatch, capsys):
    no_aws_config(monkeypatch, tmp_path)
    code, out = study(capsys, "--epoch-seconds", "30", "--output-dir", str(tmp_path / "out"), "--dry-run")
    assert code == 0, out
    assert "Dry run: nothing was sent to AWS. The study's 3 jobs:" in out
    assert re.search(r"hpml-shufflenetv2-none-w1-r1-\w{8}: new; ml.p3.2xlarge × 1, 1 × NVIDIA V100 \(16 GB\), none; "
                     r"~\$0.06 for 2 × 30.0 s per epoch \(stated by --epoch-seconds", out)
    for distribution in ("smddp", "torchrun"):
        assert f"ml.p3.16xlarge × 1, 8 × NVIDIA V100 (16 GB), {distribution}; ~$0.47" in out


def test_the_baseline_may_use_one_gpu_of_the_data_parallel_instance_type(tmp_path, monkeypatch, capsys):
    no_aws_config(monkeypatch, tmp_path)
    code, out = study(capsys, "--baseline-instance-type", "ml.p3.16xlarge", "--epoch-seconds", "30", "--output-dir",
                      str(tmp_path), "--dry-run")
    assert code == 0, out
    assert ("new; ml.p3.16xlarge × 1, 1 of its 8 NVIDIA V100 (16 GB) GPUs (the whole instance is billed), none; "
            "~$0.47 for 2 × 30.0 s") in out


@pytest.mark.parametrize("flags", [[], ["--dry-run"]])
def test_a_baseline_on_another_gpu_model_is_refused_before_anything_is_sent(flags, tmp_path, capsys):
    with moto_account(tmp_path, BUCKET) as session:
        objects = session.client("s3").list_objects_v2(Bucket=BUCKET).get("KeyCount")
        code = exit_code_of(script_main("run_study.py"), [*SAGEMAKER, *submitting(tmp_path, "--yes"),
                                                          "--instance-type", "ml.p4d.24xlarge", *flags])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert ("--baseline-instance-type ml.p3.2xlarge and --instance-type ml.p4d.24xlarge have different GPUs, "
                "NVIDIA V100 (16 GB) of compute capability 7.0 and NVIDIA A100 (40 GB) of 8.0") in err
        assert "use --baseline-instance-type ml.p4d.24xlarge" in err
        assert job_names(session) == [] and session.client("s3").list_objects_v2(Bucket=BUCKET).get(
            "KeyCount") == objects


def test_world_sizes_must_fill_whole_instances(tmp_path, capsys):
    code = exit_code_of(script_main("run_study.py"), [*SAGEMAKER, "--world-sizes", "1,4", "--output-dir",
                                                      str(tmp_path), "--dry-run"])
    assert code == 2
    assert "--world-sizes 4 does not fill whole ml.p3.16xlarge instances of 8 GPUs" in capsys.readouterr().err


def test_every_instance_type_has_a_gpu_count_model_and_price_or_says_it_has_none():
    assert sagemaker_plan.INSTANCE_GPUS["ml.p3.2xlarge"][1] == sagemaker_plan.INSTANCE_GPUS["ml.p3.16xlarge"][1]
    assert sagemaker_plan.INSTANCE_GPUS["ml.p3dn.24xlarge"][1] != sagemaker_plan.INSTANCE_GPUS["ml.p3.16xlarge"][1]
    assert {gpu.compute_capability for _, gpu in sagemaker_plan.INSTANCE_GPUS.values()} == {
        "7.0", "7.5", "8.0", "8.6", "9.0"}


def test_the_longest_job_name_fits_sagemakers_limit():
    job = sagemaker_plan.PlannedJob(Cell("densenet121", 1000, MAX_REPEATS - 1), "torchrun", "ml.p3.16xlarge", 125,
                                    "0123abcd", attempt=1000)
    assert job.job_name == "hpml-densenet121-torchrun-w1000-r1000-0123abcd-t1000"
    assert jobs.JOB_NAME.fullmatch(job.job_name)


# ---- submitting, picking up, retrying ------------------------------------------------------------------------------


def test_the_study_submits_tagged_jobs_once_and_collect_finds_them(tmp_path, capsys):
    with moto_account(tmp_path, BUCKET) as session:
        code, out = study(capsys, *submitting(tmp_path, "--yes"))
        assert code == 0, out
        names = job_names(session)
        assert [name.rsplit("-", 2)[0] for name in names] == [
            "hpml-shufflenetv2-none-w1", "hpml-shufflenetv2-smddp-w8", "hpml-shufflenetv2-torchrun-w8"]
        assert all(f"submitted {name}" in out for name in names) and "3 of 3 jobs completed" in out
        assert session.client("sagemaker").describe_training_job(TrainingJobName=names[1])[
            "ResourceConfig"]["InstanceType"] == "ml.p3.16xlarge"

        code, out = study(capsys, *submitting(tmp_path, "--yes"))  # picks the jobs up, submits nothing
        assert code == 0 and "(3 submitted before)" in out and "submitted hpml" not in out
        assert job_names(session) == names
        assert exit_code_of(script_main("sagemaker_submission.py"), ["collect", "--all"]) == 0
        assert "3 jobs to collect" in capsys.readouterr().out


def test_failed_and_stopped_jobs_are_submitted_again_and_force_submits_every_job(tmp_path, capsys):
    with moto_account(tmp_path, BUCKET) as session:
        assert study(capsys, *submitting(tmp_path, "--yes"))[0] == 0
        baseline, smddp, torchrun = job_names(session)
        end_job(baseline, "Failed", "AlgorithmError: CUDA out of memory.\nTraceback ...")
        end_job(smddp, "Stopped")
        put_results(session, baseline, "failed-attempt")
        put_results(session, f"{baseline}-t2", "second-attempt")

        code, out = study(capsys, *submitting(tmp_path, "--yes"))
        assert code == 0, out
        assert (f"{baseline}: Failed before (AlgorithmError: CUDA out of memory. Traceback ...), submitting again as "
                f"{baseline}-t2") in out
        assert f"{smddp}: Stopped before, submitting again as {smddp}-t2" in out
        assert f"{torchrun}: Completed;" in out and "jobs to submit: 2" in out
        assert job_names(session) == sorted([baseline, smddp, torchrun, f"{baseline}-t2", f"{smddp}-t2"])
        assert [result["run_id"] for result in results_in(tmp_path / "out")] == ["second-attempt"]
        assert "3 of 3 jobs completed" in out

        forced = submitting(tmp_path, "--yes", "--force", "--output-dir", str(tmp_path / "empty"))  # nothing to draw
        code, out = study(capsys, *forced)
        assert code == 0, out
        assert f"{baseline}-t2: Completed before, --force: submitting again as {baseline}-t3" in out
        assert f"{torchrun}: Completed before, --force: submitting again as {torchrun}-t2" in out
        assert {f"{baseline}-t3", f"{smddp}-t3", f"{torchrun}-t2"} <= set(job_names(session))


@pytest.mark.parametrize("answer", ["", "n\n"])
def test_the_study_submits_nothing_unless_confirmed(answer, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(answer))
    with moto_account(tmp_path, BUCKET) as session:
        code, out = study(capsys, *submitting(tmp_path))
        assert code == 1 and "submit 3 new jobs? [y/N] nothing submitted" in out
        assert job_names(session) == []
