"""What a SageMaker submission is made of, for sagemaker_submission.py and run_study.py --where sagemaker alike: the
training flags as the job's hyperparameters, where its data comes from, and collecting ended jobs with their bills.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hpml import cli, config
from hpml.config import TrainConfig, check_grad_compression, default_data_dir
from hpml.errors import UsageError, script_name
from hpml.platforms.sagemaker import jobs, prices

if TYPE_CHECKING:
    import boto3

# Folders on this machine, not forwarded: inside the job the training scripts use SageMaker's own (hpml/config.py).
LOCAL_PATH_FLAGS = ("data_dir", "output_dir", "checkpoint_dir")


def training_hyperparameters(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, str]]:
    """The validated training configuration, and every training flag of the job's script as a hyperparameter
    (SageMaker passes each back to the script as `--name value`). A job writes --tensorboard into SageMaker's
    TensorBoard folder, which submit has SageMaker upload."""
    tensorboard = config.JOB_TENSORBOARD_DIR if getattr(args, "tensorboard", None) else None
    cfg = cli.config_from_args(argparse.Namespace(**{**vars(args), "tensorboard": tensorboard}))
    if getattr(args, "checkpoint_dir", None):
        raise UsageError(f"--checkpoint-dir {args.checkpoint_dir}: a SageMaker job keeps its checkpoints in "
                         f"{config.JOB_CHECKPOINT_DIR}, synced to s3://BUCKET/hpml/checkpoints/<job name>/; "
                         "drop the flag")
    single_device = jobs.ENTRY_POINTS[args.distribution] == jobs.SINGLE_DEVICE_SCRIPT
    if single_device:
        for flag, value, default in (("--scale-lr", cfg.scale_lr, False),
                                     ("--dist-timeout", cfg.dist_timeout, cli.DEFAULTS.dist_timeout),
                                     ("--grad-compression", cfg.grad_compression, cli.DEFAULTS.grad_compression),
                                     ("--bucket-cap-mb", cfg.bucket_cap_mb, cli.DEFAULTS.bucket_cap_mb),
                                     ("--static-graph", cfg.static_graph, cli.DEFAULTS.static_graph)):
            if value != default:
                raise UsageError(f"{flag} applies to data-parallel runs; --distribution {args.distribution} runs "
                                 f"{jobs.SINGLE_DEVICE_SCRIPT}, one process: drop the flag")
    check_grad_compression(cfg.grad_compression, "smddp" if "smddp" in (args.distribution, cfg.backend) else None)
    hyperparameters = {name: value for name, value in cli.flag_values(cfg, distributed=not single_device).items()
                       if name.replace("-", "_") not in LOCAL_PATH_FLAGS}
    return cfg, hyperparameters


def data_source(args: argparse.Namespace, cfg: TrainConfig,
                spec: jobs.JobSpec) -> tuple[jobs.DataUpload | None, str | None]:
    """Point the job at its data: --s3-data as given, or a local folder to upload (returned). A dry run given neither,
    with no CIFAR-10 in the default folder, shows a placeholder location, and returns a note saying so."""
    if args.s3_data:
        jobs.parse_s3_uri(args.s3_data, "--s3-data")
    if cfg.dataset == "synthetic":
        if args.s3_data or args.data_dir:
            raise UsageError("--dataset synthetic is generated inside the job: drop --s3-data and --data-dir")
        return None, None
    if args.s3_data and args.data_dir:
        raise UsageError("pass --s3-data or --data-dir, not both")
    if args.s3_data:
        spec.s3_data = args.s3_data
        return None, None
    try:
        return jobs.DataUpload.of(Path(args.data_dir or default_data_dir()).expanduser()), None
    except UsageError as no_data:
        if args.data_dir or not args.dry_run:
            raise
        spec.s3_data = f"s3://{spec.shown_bucket}/{jobs.S3_PREFIX}/data/cifar10-SHA256_OF_YOUR_FILES/"
        return None, f"{no_data}; submit needs one of them"


def collect(boto: boto3.Session, descriptions: list[dict], output_dir: Path) -> tuple[int, int]:
    """Collect each job (as DescribeTrainingJob describes it) and print what it cost; how many had finished, and how
    many of those had outputs that could not be collected (each said in one line on stderr)."""
    finished = failed = 0
    for job in descriptions:
        try:
            written = jobs.collect_job(boto, job, output_dir)
        except jobs.CollectError as error:
            print(f"{script_name()}: error: {error}", file=sys.stderr)
            failed, written = failed + 1, []
        if job["TrainingJobStatus"] in jobs.ENDED:
            finished += 1
            print(f"{job['TrainingJobName']}: {len(written)} new files; {bill_text(prices.job_bill(job))}")
    return finished, failed


def bill_text(bill: dict) -> str:
    if bill["billable_time_s"] is None:
        return "SageMaker reported no billable time, so no cost"
    text = f"{bill['billable_time_s']:,} s billable × {bill['instance_count']}"
    if bill["cost_usd"] is None:
        return f"{text}; no price for {bill['instance_type']} in hpml/platforms/sagemaker/prices.py"
    text += f" at ${bill['price_per_instance_hour_usd']}/h on demand = ${bill['cost_usd']:,.2f}"
    if bill["spot_savings_percent"] is not None:
        text += f" (managed spot saved {bill['spot_savings_percent']:.0f}%)"
    return text
