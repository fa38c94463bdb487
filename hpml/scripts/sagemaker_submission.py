"""Submit, watch, collect and price SageMaker training jobs: run_distributed.py under SMDDP (the default) or torchrun,
or run_hpc.py on one GPU (--distribution none, the single-device baseline).

    python sagemaker_submission.py submit --dry-run --model resnet18 --instance-count 2
    python sagemaker_submission.py submit --model resnet18 --instance-count 2 --data-dir ~/cifar10 --wait
    python sagemaker_submission.py list
    python sagemaker_submission.py collect --all

`<command> --help` explains every flag. AWS credentials come only from the standard boto3 chain (environment,
~/.aws, --aws-profile, an IAM role).
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from hpml import cli, config, results
from hpml.config import (
    MAX_INSTANCE_COUNT,
    MAX_JOBS,
    SAGEMAKER_MAX_RUN_S,
    default_data_dir,
)
from hpml.errors import UsageError, script_command
from hpml.platforms.sagemaker import jobs, prices, submission

if TYPE_CHECKING:
    import boto3
    import sagemaker.session

DEFAULT_MAX_RUN_S = 2 * 3600
PLACEHOLDER_ROLE = "arn:aws:iam::ACCOUNT_ID:role/ROLE_NAME"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with jobs.aws_errors():
        return args.run(args)


# ---- flags ---------------------------------------------------------------------------------------------------------


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{submit,collect,list}")
    add_submit_parser(commands)
    add_collect_parser(commands)
    add_list_parser(commands)
    return parser


def add_submit_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "submit", help="start a training job", conflict_handler="resolve",
        description="Start a SageMaker training job that runs run_distributed.py (run_hpc.py with --distribution "
                    "none) with the training flags below, checked here first with the training scripts' own checks. "
                    "Without --wait it prints the job's name, console link and the command that collects its "
                    "results.")
    cli.add_training_args(parser)
    cli.add_distributed_args(parser)
    job = parser.add_argument_group("SageMaker job")
    job.add_argument("--instance-type", default="ml.p4d.24xlarge",
                     help="training instance type; SMDDP runs on ml.p3.16xlarge, ml.p3dn.24xlarge, ml.p4d.24xlarge "
                          "and ml.p4de.24xlarge only (default: %(default)s)")
    job.add_argument("--instance-count", type=int, default=1, help="instances in the cluster (default: %(default)s)")
    job.add_argument("--distribution", choices=tuple(jobs.DISTRIBUTIONS), default="smddp",
                     help="smddp: SageMaker's distributed data parallel library (mpirun, one process per GPU); "
                          "torchrun: PyTorch's launcher; none: run_hpc.py, the single-device baseline, on one GPU "
                          "of one instance, recorded as mode single (default: %(default)s)")
    job.add_argument("--framework-version", default=jobs.DEFAULT_FRAMEWORK_VERSION,
                     help="PyTorch version of SageMaker's training container; the default is the newest the SDK "
                          "offers SMDDP for (default: %(default)s)")
    job.add_argument("--py-version", default=jobs.DEFAULT_PY_VERSION,
                     help="Python version of that container (default: %(default)s)")
    job.add_argument("--job-name", help="training job name (default: hpml-<model>-<distribution>-<UTC time>)")
    job.add_argument("--spot", action="store_true",
                     help="managed spot training: cheaper, may be interrupted; the job then resumes from its "
                          f"checkpoints, which are always kept in S3 (synced with {config.JOB_CHECKPOINT_DIR}) "
                          "(default: off, on-demand)")
    job.add_argument("--max-run", type=int, default=DEFAULT_MAX_RUN_S, metavar="SECONDS",
                     help="stop the job after this much training time; also the cost estimate's bound "
                          "(default: %(default)s)")
    job.add_argument("--max-wait", type=int, metavar="SECONDS",
                     help="with --spot: give up after this long, waiting for spot capacity included; at least "
                          "--max-run (default: twice --max-run)")
    cli.add_switch(job, "--tensorboard", "the job writes TensorBoard scalars into SageMaker's TensorBoard folder "
                                         f"({config.JOB_TENSORBOARD_DIR}; the job installs tensorboard), which "
                                         "SageMaker uploads to s3://BUCKET/hpml/tensorboard/<job name>/")
    where = parser.add_argument_group("data, S3 and AWS")
    where.add_argument("--s3-data", metavar="S3_URI",
                       help="CIFAR-10 already in S3, e.g. s3://my-bucket/cifar10/ (train.npz and test.npz, or "
                            "cifar-10-batches-py/) (default: upload --data-dir)")
    where.add_argument("--data-dir", type=cli.path_flag, metavar="DIR",
                       help="a local CIFAR-10 folder to upload (once: files already in S3 with the same SHA-256 "
                            "are not sent again) to s3://BUCKET/hpml/data/ "
                            f"(default when no --s3-data: $HPML_CIFAR10 if set, else ./data; now {default_data_dir()})")
    where.add_argument("--bucket",
                       help="S3 bucket for code, data, outputs and checkpoints (default: the account's SageMaker "
                            "bucket sagemaker-<region>-<account id>, created if missing)")
    where.add_argument("--role", metavar="ARN",
                       help="IAM role the job runs as (default: $HPML_SAGEMAKER_ROLE, or inside a SageMaker notebook "
                            "its own role)")
    cli.add_aws_flags(where)
    parser.add_argument("--output-dir", type=cli.path_flag, default="results",
                        help="with --wait: folder the job's results JSON files are collected into "
                             "(default: %(default)s)")
    parser.add_argument("--wait", action="store_true",
                        help="stream the job's logs until it ends, then collect it (default: off)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the complete request and exit; sends nothing and needs no AWS credentials "
                             "(default: off)")
    parser.set_defaults(run=run_submit)


def add_collect_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "collect", help="bring finished jobs' results into results/",
        description="Download finished jobs' outputs from S3 and put each run's results JSON (and its monitor "
                    "files) into the output folder, with the job's billable time, spot savings and cost added, and "
                    "each run's share of that cost (by wall time, when one job trained several models). "
                    "Files already there are never overwritten, so collecting twice is harmless.")
    parser.add_argument("jobs", nargs="*", metavar="JOB", help="training job names")
    parser.add_argument("--all", action="store_true", help="every job of this suite not collected yet (default: off)")
    parser.add_argument("--output-dir", type=cli.path_flag, default="results",
                        help="where the results go (default: %(default)s)")
    cli.add_aws_flags(parser)
    parser.set_defaults(run=run_collect)


def add_list_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "list", help="this suite's recent jobs with status, time and cost",
        description="The most recent jobs submitted by this tool (found by their hpml-suite tag) with status, "
                    "instances, duration, billable time and cost (estimated so far for running jobs).")
    parser.add_argument("--limit", type=int, default=20, help="how many jobs, newest first (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table (default: off)")
    cli.add_aws_flags(parser)
    parser.set_defaults(run=run_list)


# ---- submit --------------------------------------------------------------------------------------------------------


def run_submit(args: argparse.Namespace) -> int:
    cfg, hyperparameters = submission.training_hyperparameters(args)
    check_job_limits(args)
    region = jobs.resolve_region(args.region, args.aws_profile)
    if not region and not args.dry_run:
        raise UsageError(jobs.NO_REGION)
    jobs.check_distribution(args.distribution, args.instance_type, args.instance_count, args.framework_version,
                            args.py_version, cfg.backend, cfg.device, region or "us-east-1")
    if args.wait:
        results.check_output_folder(args.output_dir)
    role = args.role or jobs.default_role(ask_aws=not args.dry_run)
    if role:
        jobs.check_role(role)
    elif not args.dry_run:
        raise UsageError("no IAM role for the job: pass --role arn:aws:iam::ACCOUNT_ID:role/NAME or set "
                         "HPML_SAGEMAKER_ROLE (a role SageMaker can assume, with access to the S3 bucket)")
    job_name = jobs.check_job_name(args.job_name) if args.job_name else jobs.job_name_for(cfg.models, args.distribution)
    spec = jobs.JobSpec(
        job_name=job_name,
        instance_type=args.instance_type, instance_count=args.instance_count, distribution=args.distribution,
        framework_version=args.framework_version, py_version=args.py_version, hyperparameters=hyperparameters,
        region=region or "us-east-1", role=role, bucket=jobs.check_bucket(args.bucket) if args.bucket else None,
        s3_data=None, spot=args.spot, max_run=args.max_run,
        max_wait=(args.max_wait or 2 * args.max_run) if args.spot else None)
    upload, data_note = submission.data_source(args, cfg, spec)
    if args.dry_run:
        print_dry_run(spec, upload, args.aws_profile, region is not None, data_note)
        return 0
    boto = jobs.aws_session(region, args.aws_profile)
    spec.bucket = jobs.ensure_bucket(boto, spec.bucket)
    if upload:
        spec.s3_data = jobs.upload_data(boto, spec.bucket, upload)
    elif spec.s3_data:
        jobs.check_s3_data(boto, spec.s3_data)
    session = jobs.sagemaker_session(boto, spec.bucket)
    jobs.submit(spec, session)
    print_submitted(spec, args)
    if not args.wait:
        return 0
    return wait_and_collect(boto, session, spec.job_name, Path(args.output_dir))


def check_job_limits(args: argparse.Namespace) -> None:
    """The job's size and time flags, checked before anything looks for AWS."""
    if args.max_run < 1:
        raise UsageError(f"--max-run must be a positive number of seconds, got {args.max_run}")
    if args.instance_count < 1:
        raise UsageError(f"--instance-count must be 1 or more, got {args.instance_count}")
    cli.require_at_most(args, instance_count=MAX_INSTANCE_COUNT, max_run=SAGEMAKER_MAX_RUN_S,
                        max_wait=SAGEMAKER_MAX_RUN_S)
    if args.max_wait is not None and not args.spot:
        raise UsageError("--max-wait applies to spot jobs only: add --spot, or drop --max-wait")
    if args.max_wait is not None and args.max_wait < args.max_run:
        raise UsageError(f"--max-wait must be at least --max-run ({args.max_run}), got {args.max_wait}")


def print_dry_run(spec: jobs.JobSpec, upload: jobs.DataUpload | None, profile: str | None, region_configured: bool,
                  data_note: str | None) -> None:
    shown = jobs.JobSpec(**{**vars(spec), "role": spec.role or PLACEHOLDER_ROLE})
    if upload:
        shown.s3_data = f"s3://{spec.shown_bucket}/{upload.prefix}"
    request = jobs.dry_run_request(shown, profile)
    print("Dry run: nothing was sent to AWS. This is the CreateTrainingJob request that submit would send:")
    print(json.dumps(request, indent=2, default=str))
    print("Notes:")
    code = stage_listing(spec.requirements)
    imported_from = ", ".join(sorted({str(package.parent) for package in jobs.CODE_PACKAGES}))
    print(f"  code: {len(code)} files ({code_summary(code)}: the hpml and models packages this client imports, "
          f"from {imported_from}, and the entry scripts; its requirements.txt lists "
          f"{', '.join(spec.requirements)}, the container's own torch is kept), packed and uploaded by the SDK "
          "to the sagemaker_submit_directory above")
    print(f"  metrics: {', '.join(jobs.METRICS)} of each model per epoch (MetricDefinitions above, named "
          "<model>:<metric>), read by SageMaker from the line each epoch prints, charted in its console and CloudWatch")
    if upload:
        print(f"  data: {len(upload.files)} files ({upload.size / 1e6:.1f} MB) from {upload.folder}, uploaded to "
              "the training channel's S3 location above unless the same files are already there")
    elif data_note:
        print(f"  data: {data_note}")
    elif spec.s3_data:
        print(f"  data: {spec.s3_data} as given; submit checks that it holds files")
    else:
        print("  data: the synthetic data set, generated inside the job")
    if not spec.bucket:
        print("  bucket: ACCOUNT_ID stands for your AWS account number: without --bucket, submit uses the "
              f"account's sagemaker-{spec.region}-<account id> bucket")
    if not spec.role:
        print("  role: none given yet; submit needs --role or HPML_SAGEMAKER_ROLE")
    if not region_configured:
        print("  region: none configured (--region, AWS_REGION, or `aws configure`); shown for us-east-1")
    print(f"  cost: {cost_estimate(spec)}")


def stage_listing(requirements: tuple[str, ...]) -> list[Path]:
    with tempfile.TemporaryDirectory() as folder:
        return jobs.stage_source(Path(folder), requirements, log=lambda line: print(f"  {line}"))


def code_summary(staged: list[Path]) -> str:
    """The staged files: each top-level file by name, each folder by name and how many files it holds."""
    counts: dict[str, int] = {}
    for path in staged:
        top = f"{path.parts[0]}/" if len(path.parts) > 1 else path.name
        counts[top] = counts.get(top, 0) + 1
    return ", ".join(f"{top} ({cli.count(count, 'file')})" if top.endswith("/") else top
                     for top, count in counts.items())


def cost_estimate(spec: jobs.JobSpec) -> str:
    price = prices.hourly_price(spec.instance_type)
    if price is None:
        return f"no on-demand price for {spec.instance_type} in hpml/platforms/sagemaker/prices.py, so no estimate"
    return (f"at most ${spec.estimated_cost():,.2f}: {spec.instance_type} × {spec.instance_count} at ${price}/h on "
            f"demand for the whole --max-run of {spec.max_run / 3600:.2g} h (us-east-1 prices from "
            "hpml/platforms/sagemaker/prices.py"
            f"{'; spot usually bills less' if spec.spot else ''})")


def print_submitted(spec: jobs.JobSpec, args: argparse.Namespace) -> None:
    print(f"submitted {spec.job_name}: {spec.instance_type} × {spec.instance_count}, {spec.distribution}, "
          f"PyTorch {spec.framework_version}{', spot' if spec.spot else ''}")
    print(f"  console: {jobs.console_url(spec.region, spec.job_name)}")
    print(f"  cost: {cost_estimate(spec)}")
    if not args.wait:
        where = ["--region", spec.region, *(["--aws-profile", args.aws_profile] if args.aws_profile else [])]
        print(f"  when it has finished: {collect_command(spec.job_name, *where)}")


def collect_command(*arguments: str) -> str:
    """The shell command that collects a job, started as this script was, each value quoted for the shell."""
    return shlex.join([*script_command(), "collect", *arguments])


def wait_and_collect(boto: boto3.Session, session: sagemaker.session.Session, job_name: str,
                     output_dir: Path) -> int:
    print(f"streaming the logs of {job_name} until it ends (Ctrl-C stops watching, not the job)")
    try:
        job = jobs.stream_logs(session, job_name)
    except KeyboardInterrupt:
        print(f"\nstopped watching; {job_name} keeps running: {collect_command(job_name)}")
        return 130
    reason = f" ({job['FailureReason']})" if job.get("FailureReason") else ""
    print(f"{job_name}: {job['TrainingJobStatus']}{reason}")
    _, failed = submission.collect(boto, [job], output_dir)
    return 0 if job["TrainingJobStatus"] == "Completed" and not failed else 1


# ---- collect and list ----------------------------------------------------------------------------------------------


def run_collect(args: argparse.Namespace) -> int:
    if bool(args.jobs) == args.all:
        raise UsageError("name the jobs to collect, or pass --all (not both)")
    for name in args.jobs:
        jobs.check_job_name(name)
    output_dir = results.check_output_folder(args.output_dir)
    boto = jobs.aws_session(args.region, args.aws_profile)
    if args.all:
        done = jobs.collected_jobs(output_dir)
        descriptions = [job for job in jobs.suite_jobs(boto) if job["TrainingJobName"] not in done]
        print(f"{cli.count(len(descriptions), 'job')} to collect ({len(done)} already in {output_dir})")
    else:
        descriptions = [jobs.describe(boto, name) for name in args.jobs]
    finished, failed = submission.collect(boto, descriptions, output_dir)
    return 0 if not failed and (args.all or finished == len(descriptions)) else 1


def run_list(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise UsageError(f"--limit must be 1 or more, got {args.limit}")
    cli.require_at_most(args, limit=MAX_JOBS)
    boto = jobs.aws_session(args.region, args.aws_profile)
    now = datetime.now(timezone.utc)
    rows = [job_row(job, now) for job in jobs.suite_jobs(boto, args.limit)]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no jobs of this suite in {boto.region_name}")
    else:
        print_table(rows)
    return 0


def job_row(job: dict, now: datetime) -> dict:
    bill = prices.job_bill(job, now)
    return {
        "job_name": job["TrainingJobName"],
        "status": job["TrainingJobStatus"],
        "model": jobs.job_models(job),
        "created": job["CreationTime"].isoformat(timespec="seconds"),
        **{key: bill[key] for key in ("instance_type", "instance_count", "spot", "training_time_s", "billable_time_s",
                                      "cost_usd", "estimated_cost_usd")},
    }


def print_table(rows: list[dict]) -> None:
    def money(row: dict) -> str:
        if row["cost_usd"] is not None:
            return f"${row['cost_usd']:,.2f}"
        return f"~${row['estimated_cost_usd']:,.2f} so far" if row["estimated_cost_usd"] is not None else "-"

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value / 60:,.1f} min"

    table = [("JOB", "STATUS", "MODEL", "INSTANCES", "CREATED", "DURATION", "BILLABLE", "COST")]
    table += [(row["job_name"], row["status"], row["model"],
               f"{row['instance_type']} × {row['instance_count']}{' spot' if row['spot'] else ''}", row["created"],
               seconds(row["training_time_s"]), seconds(row["billable_time_s"]), money(row)) for row in rows]
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


def run_as_script() -> NoReturn:
    """main on the command line, as sagemaker_submission.py, `python -m hpml.scripts.sagemaker_submission` and
    hpml-sagemaker run it."""
    cli.run_script(main)


if __name__ == "__main__":
    run_as_script()
