"""run_study.py --where sagemaker against a local moto server: the plan, its GPUs, time and costs, submitting,
retrying and collecting.

moto records training jobs but runs nothing: a job is "Completed" at once, and it has no call that fails or stops
one, so `end_job` sets the status in the server's own store, as SageMaker would when a job ends so, and `bill_job`
its billable time, which moto does not report. moto's Service Quotas knows no SageMaker quota and has no
ListServiceQuotas: `account_quotas` gives its server the call, answering with the quotas a test names.
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
from moto.servicequotas.responses import ServiceQuotasResponse

from hpml.config import MAX_REPEATS
from hpml.platforms.sagemaker import estimate, jobs, plan
from hpml.study.matrix import Cell
from tests.helpers import exit_code_of, moto_account, no_aws_config, record, refusal, results_in, script_main

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


def bill_job(name: str, billable_s: int) -> None:
    sagemaker_backends["123456789012"]["us-east-1"].training_jobs[name].billable_time_in_seconds = billable_s


def put_results(session: boto3.Session, job_name: str, *models: str) -> None:
    """A results record of each model (shufflenetv2 when none is named) where SageMaker uploads the job's output."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for model in models or ("shufflenetv2",):
            run_id = f"{job_name}-{model}"
            content = json.dumps(record(run_id, model=model, total_wall_time_s=60.0)).encode()
            info = tarfile.TarInfo(f"results/{run_id}.json")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    session.client("s3").put_object(Bucket=BUCKET, Key=f"hpml/output/{job_name}/output/output.tar.gz",
                                    Body=buffer.getvalue())


@pytest.fixture
def account_quotas(monkeypatch):
    """Make the moto server answer ListServiceQuotas with the quotas set in the returned dict."""
    quotas: dict[str, float] = {}

    def list_service_quotas(self):
        return json.dumps({"Quotas": [{"QuotaName": name, "Value": value} for name, value in quotas.items()]})

    monkeypatch.setattr(ServiceQuotasResponse, "list_service_quotas", list_service_quotas, raising=False)
    return quotas


def throughput_file(tmp_path) -> str:
    """A bench/throughput.py --json report: shufflenetv2 at 100 images/s on one GPU, 50% scaling on 8."""
    path = tmp_path / "throughput.json"
    path.write_text(json.dumps({"device": "NVIDIA V100-SXM2-16GB", "models": {"shufflenetv2": {
        "fast_images_per_s": 100.0}}, "ddp": {"nproc": 8, "models": {"shufflenetv2": {"scaling_efficiency": 0.5}}}}))
    return str(path)


# ---- the plan: one GPU model, shown ----------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_with_gpus_and_costs_and_sends_nothing(tmp_path, monkeypatch, capsys):
    no_aws_config(monkeypatch, tmp_path)
    code, out = study(capsys, "--epoch-seconds", "30", "--output-dir", str(tmp_path / "out"), "--dry-run")
    assert code == 0, out
    assert "Dry run: nothing was sent to AWS. The study's 3 jobs:" in out
    assert re.search(r"hpml-none-w1-r1-\w{8}: new; ml.p3.2xlarge × 1, 1 × NVIDIA V100 \(16 GB\), none\n  models: "
                     r"shufflenetv2\n  estimate: training ~1 min 00 s \(time per epoch stated by --epoch-seconds\), "
                     r"start-up ~6 min 00 s, ~\$0.06 on demand", out)
    for distribution in ("smddp", "torchrun"):
        assert re.search(rf"× 1, 8 × NVIDIA V100 \(16 GB\), {distribution}\n.*\n.*~\$0.47 on demand", out)


def test_five_models_at_three_world_sizes_are_five_jobs_each_training_every_model(tmp_path, monkeypatch, capsys):
    no_aws_config(monkeypatch, tmp_path)
    code, out = study(capsys, "--models", "all", "--world-sizes", "1,8,16", "--epoch-seconds", "30", "--output-dir",
                      str(tmp_path), "--dry-run")
    assert code == 0, out
    assert "The study's 5 jobs:" in out
    assert out.count("  models: vgg16, resnet18, mobilenetv2, shufflenetv2, densenet121\n") == 5
    assert [re.sub(r"-\w{8}$", "", name) for name in re.findall(r"^(hpml-\S+): new;", out, re.MULTILINE)] == [
        "hpml-none-w1-r1", "hpml-smddp-w8-r1", "hpml-torchrun-w8-r1", "hpml-smddp-w16-r1", "hpml-torchrun-w16-r1"]
    assert re.search(r"wall time \(an estimate, 1 job at a time\): ~.+ with warm pools, ~.+ without", out)
    assert re.search(r"cost \(an estimate\): ~\$[\d.,]+ on demand without warm pools, ~\$[\d.,]+ with them "
                     r"\(2 hand-overs\); ~\$[\d.,]+ on spot", out)
    assert "jobs at once: 1, as no quota is known (a dry run asks AWS for no quota)" in out
    code, out = study(capsys, "--models", "all", "--world-sizes", "1,8,16", "--output-dir", str(tmp_path),
                      "--job-per-model", "--dry-run")
    assert code == 0 and "The study's 25 jobs:" in out and "no time per epoch for" in out


def test_the_plans_arithmetic_on_a_stated_throughput(tmp_path, monkeypatch, capsys):
    """50,000 images at 100 images/s: 500 s an epoch on one GPU, 125 s on eight at 50% scaling; 2 epochs each."""
    no_aws_config(monkeypatch, tmp_path)
    code, out = study(capsys, "--throughput", throughput_file(tmp_path), "--output-dir", str(tmp_path / "out"),
                      "--dry-run")
    assert code == 0, out
    assert "training ~16 min 40 s (time per epoch " in out and "~$1.06 on demand, ~$0.32 on spot" in out
    assert out.count("training ~4 min 10 s") == 2 and out.count("~$1.96 on demand, ~$0.59 on spot") == 2
    assert "(NVIDIA V100-SXM2-16GB; one GPU)" in out and "(NVIDIA V100-SXM2-16GB; 50% scaling measured)" in out
    # one job at a time: 6 + 16:40 min, 6 + 4:10 min, then 1 + 4:10 min on the warm instances (or 6 + 4:10 cold)
    assert "~38 min 00 s with warm pools, ~43 min 00 s without" in out
    assert "~$4.97 on demand without warm pools, ~$5.44 with them (1 hand-over); ~$1.49 on spot" in out
    assert "start-up: 6 min per job on new instances, 1 min on warm ones (not measured" in out


def test_a_throughput_file_that_is_not_one_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "throughput.json"
    path.write_text('{"device": "GPU", "models": {"shufflenetv2": {"fast_images_per_s": -5}}}')
    err = refusal(script_main("run_study.py"), [*SAGEMAKER, "--throughput", str(path), "--output-dir", str(tmp_path),
                                                "--dry-run"], capsys)
    assert f"--throughput {path}: images per second must be positive numbers" in err


def test_a_job_on_warm_instances_waits_for_the_one_before_and_starts_sooner():
    jobs_ = [("a", 100.0), ("a", 100.0), ("b", 100.0)]
    assert estimate.wall_seconds(jobs_, 2, 10.0, 1.0, {"a"}) == 211.0  # a, b at once; then a warm
    assert estimate.wall_seconds(jobs_, 2, 10.0, 1.0, set()) == 220.0  # a, a at once; then b


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
    assert plan.INSTANCE_GPUS["ml.p3.2xlarge"][1] == plan.INSTANCE_GPUS["ml.p3.16xlarge"][1]
    assert plan.INSTANCE_GPUS["ml.p3dn.24xlarge"][1] != plan.INSTANCE_GPUS["ml.p3.16xlarge"][1]
    assert {gpu.compute_capability for _, gpu in plan.INSTANCE_GPUS.values()} == {
        "7.0", "7.5", "8.0", "8.6", "9.0"}


def test_the_longest_job_name_fits_sagemakers_limit():
    job = plan.PlannedJob((Cell("densenet121", 1000, MAX_REPEATS - 1),), "torchrun", "ml.p3.16xlarge", 125,
                                    "0123abcd", per_model=True, attempt=1000)
    assert job.job_name == "hpml-densenet121-torchrun-w1000-r1000-0123abcd-t1000"
    assert jobs.JOB_NAME.fullmatch(job.job_name)


# ---- submitting, picking up, retrying ------------------------------------------------------------------------------


def test_the_study_submits_tagged_jobs_once_and_collect_finds_them(tmp_path, capsys):
    with moto_account(tmp_path, BUCKET) as session:
        code, out = study(capsys, *submitting(tmp_path, "--yes"))
        names = job_names(session)
        assert [name.rsplit("-", 2)[0] for name in names] == [
            "hpml-none-w1", "hpml-smddp-w8", "hpml-torchrun-w8"]
        assert all(f"submitted {name}" in out for name in names) and "3 of 3 jobs completed" in out
        assert code == 1 and "no results yet for hpml-none-w1-r1-" in out  # moto's jobs bring back nothing
        assert session.client("sagemaker").describe_training_job(TrainingJobName=names[1])[
            "ResourceConfig"]["InstanceType"] == "ml.p3.16xlarge"

        for name in names:
            put_results(session, name)
        code, out = study(capsys, *submitting(tmp_path, "--yes"))  # collects the jobs, submits nothing
        assert code == 0 and "(3 submitted before)" in out and "submitted hpml" not in out, out
        assert job_names(session) == names and len(results_in(tmp_path / "out")) == 3
        assert exit_code_of(script_main("sagemaker_submission.py"), ["collect", "--all", "--output-dir",
                                                                     str(tmp_path / "all")]) == 0
        assert "3 jobs to collect" in capsys.readouterr().out and len(results_in(tmp_path / "all")) == 3


@pytest.mark.parametrize("setup", ["on demand", "spot", "no warm pool quota"])
def test_one_job_per_instance_setup_carries_every_model_and_keeps_warm_for_the_next(setup, tmp_path, capsys,
                                                                                     request):
    if setup == "no warm pool quota":
        request.getfixturevalue("account_quotas").update({
            "ml.p3.2xlarge for training job usage": 4, "ml.p3.16xlarge for training job usage": 2,
            "ml.p3.16xlarge for training warm pool usage": 0})
    with moto_account(tmp_path, BUCKET) as session:
        _, out = study(capsys, *submitting(tmp_path, "--yes", "--models", "resnet18,shufflenetv2",
                                           *(["--spot"] if setup == "spot" else [])))
        sagemaker = session.client("sagemaker")
        requests = {name.rsplit("-", 2)[0]: sagemaker.describe_training_job(TrainingJobName=name)
                    for name in job_names(session)}
        assert list(requests) == ["hpml-none-w1", "hpml-smddp-w8", "hpml-torchrun-w8"], out
        assert {json.loads(job["HyperParameters"]["model"]) for job in requests.values()} == {"resnet18,shufflenetv2"}
        keep_alive = {name: job["ResourceConfig"].get("KeepAlivePeriodInSeconds") for name, job in requests.items()}
        warm = setup == "on demand"
        assert keep_alive == {"hpml-none-w1": None, "hpml-smddp-w8": 600 if warm else None, "hpml-torchrun-w8": None}
        assert ("keeps its instances warm up to 600 s for hpml-torchrun-w8-r1-" in out) == warm
        if setup == "spot":
            assert ("warm pools: ml.p3.2xlarge × 1, ml.p3.16xlarge × 1: managed spot training cannot keep instances "
                    "warm\n") in out
        if setup == "no warm pool quota":
            assert ("ml.p3.16xlarge × 1: the account's quota 'ml.p3.16xlarge for training warm pool usage' is 0" in out
                    and "jobs at once: 2, as the account's SageMaker quotas in us-east-1 allow" in out)
        else:
            assert "jobs at once: 1, as no quota is known (Service Quotas did not answer" in out


def test_a_packed_jobs_records_come_back_each_with_its_share_of_the_bill(tmp_path, capsys):
    models = ["vgg16", "resnet18", "mobilenetv2", "shufflenetv2", "densenet121"]
    with moto_account(tmp_path, BUCKET) as session:
        study(capsys, *submitting(tmp_path, "--yes", "--models", "all", "--world-sizes", "1"))
        (name,) = job_names(session)
        put_results(session, name, *models)
        bill_job(name, 1200)
        code, out = study(capsys, *submitting(tmp_path, "--yes", "--models", "all", "--world-sizes", "1"))
        assert code == 0 and "submitted hpml" not in out, out
        collected = results_in(tmp_path / "out")
        assert sorted(result["model"] for result in collected) == sorted(models)
        assert {result["sagemaker"]["job_name"] for result in collected} == {name}
        bill = 1200 * 3.825 / 3600
        assert sum(result["sagemaker"]["cost_usd"] for result in collected) == pytest.approx(bill)
        assert [result["sagemaker"]["billable_time_share_s"] for result in collected] == pytest.approx([240] * 5)


def test_the_models_a_packed_job_lost_are_trained_again_alone(tmp_path, capsys):
    with moto_account(tmp_path, BUCKET) as session:
        flags = submitting(tmp_path, "--yes", "--models", "all", "--world-sizes", "1")
        study(capsys, *flags)
        (name,) = job_names(session)
        end_job(name, "Stopped")
        put_results(session, name, "vgg16", "resnet18", "mobilenetv2", "shufflenetv2")
        code, out = study(capsys, *flags)
        assert (f"{name}: Stopped before with no results for densenet121 (1 of 5 models): submitting it alone as "
                f"{name}-t2") in out
        assert json.loads(session.client("sagemaker").describe_training_job(TrainingJobName=f"{name}-t2")[
            "HyperParameters"]["model"]) == "densenet121"
        assert len(results_in(tmp_path / "out")) == 4 and code == 1 and "(densenet121)" in out


def test_failed_and_stopped_jobs_are_submitted_again_and_force_submits_every_job(tmp_path, capsys):
    with moto_account(tmp_path, BUCKET) as session:
        study(capsys, *submitting(tmp_path, "--yes"))
        baseline, smddp, torchrun = job_names(session)
        end_job(baseline, "Failed", "AlgorithmError: CUDA out of memory.\nTraceback ...")
        end_job(smddp, "Stopped")
        for name in (torchrun, f"{baseline}-t2", f"{smddp}-t2"):
            put_results(session, name)

        code, out = study(capsys, *submitting(tmp_path, "--yes"))
        assert code == 0, out
        assert (f"{baseline}: Failed before (AlgorithmError: CUDA out of memory. Traceback ...), submitting again as "
                f"{baseline}-t2") in out
        assert f"{smddp}: Stopped before, submitting again as {smddp}-t2" in out
        assert f"{torchrun}: Completed\n" in out and "study, 2 jobs to submit" in out
        assert job_names(session) == sorted([baseline, smddp, torchrun, f"{baseline}-t2", f"{smddp}-t2"])
        assert len(results_in(tmp_path / "out")) == 3 and "3 of 3 jobs completed" in out

        forced = submitting(tmp_path, "--yes", "--force", "--output-dir", str(tmp_path / "again"))
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
