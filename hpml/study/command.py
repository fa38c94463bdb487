"""The whole study in one command: every model at every world size, then the figures. `--help` lists every flag.

    python run_study.py --models resnet18,shufflenetv2 --world-sizes 1,2 --dataset synthetic --subset 256 --epochs 1

World size 1 runs run_hpc.py (the single-device baseline), larger ones torchrun --standalone with that many
run_distributed.py processes (one per GPU, or gloo processes on a CPU). Cells whose results are already in
--output-dir are skipped, so an interrupted study continues where it stopped. The exit code is 0 only when every
cell finished. Ctrl-C or SIGTERM stops the running cell at a checkpoint (a second Ctrl-C kills it at once) and
ends the study with exit code 130 or 143; the same command with --resume continues it.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hpml import cli, files, results
from hpml.config import MAX_JOBS, MAX_REPEATS, SAGEMAKER_MAX_RUN_S, TrainConfig, flag_of
from hpml.errors import UsageError
from hpml.platforms import slurm
from hpml.platforms.sagemaker import estimate, plan, quotas
from hpml.study import matrix

if TYPE_CHECKING:
    import boto3
    import sagemaker.session

    from hpml.platforms.sagemaker import jobs

POLL_S = 60  # seconds between looks at running SageMaker jobs
# How long a job keeps its instances warm for the next of its setup: that one is submitted within a look (POLL_S)
# of its end, and a run interrupted between them leaves the instances billed this long at most.
KEEP_ALIVE_S = 600
WARM_POOL_MAX_S = 3600  # the longest KeepAlivePeriodInSeconds SageMaker's warm pool documentation allows


def main(argv: Sequence[str] | None = None) -> int:
    """run_study.py: its flags, then `run`."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The study that the flags in `args` describe (build_parser's); the exit code: 0 only when every cell finished."""
    check_sagemaker_numbers(args)
    options = slurm_options(args)
    slurm.check_counts(options)
    args.model = args.models
    world_sizes = matrix.parse_world_sizes(args.world_sizes)
    cfg = matrix.common_speed_settings(cli.config_from_args(args), world_sizes)
    args.cuda_graphs = cfg.cuda_graphs  # what SageMaker jobs are given too
    cells = matrix.plan(cfg.models, world_sizes, args.repeats)
    if args.where == "sagemaker":
        if args.collect:
            raise UsageError("--where sagemaker waits for its jobs and collects them itself: drop --collect")
        return run_on_sagemaker(args, cfg, cells)
    matrix.check_environment()
    if args.where == "slurm":
        options.check(world_sizes)
        slurm.check_output_dir(cfg.output_dir)
    elif args.collect:
        raise UsageError(f"--collect gathers the results of --where slurm jobs; --where {args.where} runs the cells "
                         "and draws at the end")
    trained_on = matrix.local_processor(cfg.device) if args.where == "local" else None  # a SLURM node's: not known
    output_dir, figures_dir = results.check_output_folder(cfg.output_dir), results.check_output_folder(args.figures_dir)
    if args.collect:
        return draw_finished(cells, cfg, output_dir, figures_dir)
    records, _ = results.load_all(output_dir)
    to_run = matrix.cells_to_run(cells, records, cfg, force=args.force, trained_on=trained_on)
    print(f"{cli.count(len(cells), 'cell')}{f' on {trained_on}' if trained_on else ''}: "
          f"{len(cells) - len(to_run)} already in {output_dir}, {len(to_run)} to run")
    if args.where == "slurm":
        return submit_to_slurm(args, options, cfg, to_run, output_dir)
    if args.dry_run:
        for cell in to_run:
            print(shlex.join(matrix.local_command(cell, cfg)))
        return 0
    for cell in matrix.run_cells(to_run, cfg):
        print(f"failed: {cell}")
    return draw_finished(cells, cfg, output_dir, figures_dir, trained_on)


def check_sagemaker_numbers(args: argparse.Namespace) -> None:
    """The study's counts and the SageMaker plan's numbers, each checked before anything else happens."""
    cli.require_positive(args, "repeats", "max_run")
    if args.max_jobs is not None:
        cli.require_positive(args, "max_jobs")
    if args.epoch_seconds is not None and not args.epoch_seconds > 0:
        raise UsageError(f"--epoch-seconds must be a positive number, got {args.epoch_seconds}")
    for name in ("startup_minutes", "warm_startup_minutes"):
        if not getattr(args, name) >= 0:
            raise UsageError(f"{flag_of(name)} must be 0 or more minutes, got {getattr(args, name)}")
    if not 0 <= args.spot_savings < 100:
        raise UsageError(f"--spot-savings must be a percentage from 0 to below 100, got {args.spot_savings}")
    if args.keep_alive < 0:
        raise UsageError(f"--keep-alive must be 0 (off) or a number of seconds, got {args.keep_alive}")
    cli.require_at_most(args, repeats=MAX_REPEATS, max_jobs=MAX_JOBS, max_run=SAGEMAKER_MAX_RUN_S,
                        epoch_seconds=SAGEMAKER_MAX_RUN_S, keep_alive=WARM_POOL_MAX_S,
                        startup_minutes=SAGEMAKER_MAX_RUN_S / 60, warm_startup_minutes=SAGEMAKER_MAX_RUN_S / 60)


def slurm_options(args: argparse.Namespace) -> slurm.JobOptions:
    names = {flag: getattr(args, flag) for flag in slurm.NAMES if getattr(args, flag) is not None}
    return slurm.JobOptions(gpus_per_node=args.gpus_per_node, processes_per_node=args.processes_per_node,
                            cpus_per_task=args.cpus_per_task, time_limit=args.time_limit, names=names,
                            sbatch_args=args.sbatch_arg, setup=args.setup)


def submit_to_slurm(args: argparse.Namespace, options: slurm.JobOptions, cfg: TrainConfig, to_run: list[matrix.Cell],
                    output_dir: Path) -> int:
    """One sbatch script per cell, in <output-dir>/slurm/, submitted (printed with --dry-run). A cell submitted
    before (its job id in <job-name>.job) is submitted again only when its job failed or SLURM no longer knows it,
    or with --force."""
    folder, submitted = output_dir / "slurm", 0
    for cell in to_run:
        script = slurm.batch_script(cell, cfg, options)
        name = slurm.job_name(cell, cfg)
        path, job_file = folder / f"{name}.sbatch", folder / f"{name}.job"
        command = slurm.sbatch_command(path, folder, cell, cfg, options.sbatch_args)
        if args.dry_run:
            print(f"# {shlex.join(command)}\n{script}")
            continue
        if job_file.exists() and not args.force:
            earlier = slurm.earlier_job(job_file)
            again, why = slurm.submit_again(earlier, slurm.log_file(folder, cell, cfg, earlier), job_file)
            print(f"{cell}: {why}")
            if not again:
                continue
        files.write_atomic(path, lambda tmp, script=script: tmp.write_text(script))
        job = slurm.submit(command)
        files.write_atomic(job_file, lambda tmp, job=job: tmp.write_text(job + "\n"))
        print(f"{cell}: submitted as job {job} ({path})")
        submitted += 1
    if submitted:
        print("when the jobs have ended, run the same command with --collect to draw what has finished")
    return 0


def run_on_sagemaker(args: argparse.Namespace, cfg: TrainConfig, cells: list[matrix.Cell]) -> int:
    """Plan the jobs and print them with their models, GPUs, estimated time and cost; unless --dry-run, submit the new
    ones (--yes or a prompt) at most --max-jobs at a time, wait for them, collect and draw. Jobs submitted before are
    picked up, not paid for again: their names are fixed by distribution, world size, repeat, models and settings.
    One whose latest attempt ended with models that brought back no results submits a next attempt (-t2, -t3, ...)
    with just those models; with --force, every job submits one with all of its models."""
    from hpml.platforms.sagemaker import (  # here: a local or SLURM study loads neither boto3 nor the SDK
        jobs,
        submission,
    )

    args.framework_version = args.framework_version or jobs.DEFAULT_FRAMEWORK_VERSION
    args.py_version = args.py_version or jobs.DEFAULT_PY_VERSION
    planned = plan.plan_jobs(cells, cfg, args.instance_type, args.baseline_instance_type,
                                       args.job_per_model)
    specs = {job.base_name: job_spec(args, job) for job in planned}
    first = specs[planned[0].base_name]
    upload, data_note = submission.data_source(args, cfg, first)
    output_dir, figures_dir = results.check_output_folder(cfg.output_dir), results.check_output_folder(args.figures_dir)
    throughput = estimate.Throughput.load(Path(args.throughput)) if args.throughput else None
    assumptions = estimate.Assumptions.of(cfg, args.epoch_seconds, throughput, args.startup_minutes,
                                                args.warm_startup_minutes, args.spot_savings, args.max_run, POLL_S)
    records, _ = results.load_all(output_dir)
    if args.dry_run:
        steps = plan.next_steps(planned, collected_attempts(records), records, args.force)
        print(f"Dry run: nothing was sent to AWS. The study's {cli.count(len(planned), 'job')}:")
        print_plan(steps, assumptions, records, allowance(args, steps, None, "a dry run asks AWS for no quota"),
                   args.keep_alive)
        if data_note:
            print(f"data: {data_note}")
        return 0
    role = args.role or jobs.default_role(ask_aws=True)
    if not role:
        raise UsageError("no IAM role for the jobs: pass --role arn:aws:iam::ACCOUNT_ID:role/NAME or set "
                         "HPML_SAGEMAKER_ROLE")
    jobs.check_role(role)
    boto = jobs.aws_session(args.region, args.aws_profile)
    known = {job["TrainingJobName"]: job for job in jobs.suite_jobs(boto)}
    records = collect_ended_attempts(boto, planned, known, output_dir) or records
    steps = plan.next_steps(planned, known, records, args.force)
    allowed = allowance(args, steps, *jobs.account_quotas(boto))
    print(f"The study's {cli.count(len(planned), 'job')} ({sum(bool(step.latest) for step in steps)} submitted "
          "before):")
    print_plan(steps, assumptions, records, allowed, args.keep_alive)
    new_jobs = [step.job for step in steps if step.submit]
    keeps_warm = plan.warm_successors(new_jobs, allowed.warm_setups)
    new = [dataclasses.replace(specs[job.base_name], job_name=jobs.check_job_name(job.job_name),
                               hyperparameters={**specs[job.base_name].hyperparameters, "model": ",".join(job.models)},
                               keep_alive=args.keep_alive if job.job_name in keeps_warm else None)
           for job in new_jobs]
    if new and not args.yes and not confirmed(f"submit {cli.count(len(new), 'new job')}? [y/N] "):
        print("nothing submitted")
        return 1
    if new:
        prepare_submission(boto, new, role, upload, first.s3_data)
    session = jobs.sagemaker_session(boto, new[0].bucket) if new else None
    earlier = [(step.job.job_name, step.job.setup) for step in steps if not step.submit]
    ended = wait_for_jobs(boto, new, earlier, allowed.max_jobs, allowed.warm_setups, session)
    return collect_and_draw(boto, ended, planned, output_dir, figures_dir)


def allowance(args: argparse.Namespace, steps: list[plan.Step], quota_values: dict[str, float] | None,
              quota_note: str) -> quotas.Allowance:
    """Jobs at once and warm pools for the jobs to submit, from the flags and the account's quotas."""
    setups = list(dict.fromkeys(step.job.setup for step in steps if step.submit))
    return quotas.Allowance.of(setups, args.max_jobs, args.spot, args.keep_alive, quota_values, quota_note)


def collected_attempts(records: list[dict]) -> dict[str, dict]:
    """The jobs whose results were collected into `records`, as far as the records tell: a dry run's stand-in for
    what SageMaker knows."""
    return {record["sagemaker"]["job_name"]: {"TrainingJobStatus": record["sagemaker"].get("status") or "Completed"}
            for record in records if (record.get("sagemaker") or {}).get("job_name")}


def collect_ended_attempts(boto: boto3.Session, planned: list[plan.PlannedJob], known: dict[str, dict],
                           output_dir: Path) -> list[dict]:
    """Collect every ended attempt at a planned job not collected before, so that the plan knows which models
    brought back results; the output folder's records afterwards ([] when nothing was collected)."""
    from hpml.platforms.sagemaker import jobs, submission

    done = jobs.collected_jobs(output_dir)
    ended = [description for name, description in known.items()
             if description["TrainingJobStatus"] in jobs.ENDED and name not in done
             and any(plan.attempt_of(job, name) for job in planned)]
    if not ended:
        return []
    submission.collect(boto, ended, output_dir)
    return results.load_all(output_dir)[0]


def print_plan(steps: list[plan.Step], assumptions: estimate.Assumptions, records: list[dict],
               allowance: quotas.Allowance, keep_alive: int) -> None:
    """Print every job with its estimate, then the study's, and the assumptions beside them."""
    new = [step.job for step in steps if step.submit]
    keeps_warm = plan.warm_successors(new, allowance.warm_setups)
    warmed_by = {later: earlier for earlier, later in keeps_warm.items()}
    estimates = {job.job_name: estimate.estimate_job(job, assumptions, records) for job in new}
    for step in steps:
        name = step.job.job_name
        print("\n".join(estimate.job_lines(step, estimates.get(name), assumptions, warmed_by.get(name),
                                                 keeps_warm.get(name), keep_alive)))
    if not new:
        print("nothing to submit")
        return
    print("\n".join(estimate.study_lines(new, list(estimates.values()), assumptions, allowance.max_jobs,
                                               allowance.warm_setups, allowance.warm_note)))
    print(f"  jobs at once: {allowance.max_jobs}, {allowance.max_jobs_note}")
    print("\n".join(["  assumptions:", *(f"    {line}" for line in assumptions.lines())]))


def collect_and_draw(boto: boto3.Session, ended: list[dict], planned: list[plan.PlannedJob],
                     output_dir: Path, figures_dir: Path) -> int:
    """Collect the ended jobs (the latest attempt of each planned job) not collected before, and draw; exit code 0
    only when every one completed and every model of the study brought back its results."""
    from hpml.platforms.sagemaker import jobs, submission

    done = jobs.collected_jobs(output_dir)
    _, uncollected = submission.collect(boto, [job for job in ended if job["TrainingJobName"] not in done],
                                                  output_dir)
    records = draw(output_dir, figures_dir)
    failed = [job["TrainingJobName"] for job in ended if job["TrainingJobStatus"] != "Completed"]
    missing = [f"{job.base_name} ({', '.join(models)})" for job in planned
               if (models := [model for model in job.models
                              if model not in plan.models_with_results(job, records)])]
    print(f"{len(ended) - len(failed)} of {cli.count(len(planned), 'job')} completed"
          + (f"; not completed: {', '.join(failed)}" if failed else "")
          + (f"; {cli.count(uncollected, 'job')} whose outputs could not be collected" if uncollected else "")
          + (f"; no results yet for {'; '.join(missing)}: run the same command to train them again" if missing
             else ""))
    return 1 if failed or uncollected or missing else 0


def confirmed(question: str) -> bool:
    """Whether the user answers yes; no answer (no terminal) is no."""
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:
        return False


def job_spec(args: argparse.Namespace, job: plan.PlannedJob) -> jobs.JobSpec:
    """The JobSpec of a planned job, checked with the submit command's own checks (before anything is sent)."""
    from hpml.platforms.sagemaker import jobs, submission

    baseline = job.distribution == "none"  # one process: the data-parallel flags mean nothing there
    data_parallel_defaults = {name: getattr(cli.DEFAULTS, name)
                              for name in (*matrix.DATA_PARALLEL_FIELDS, "dist_timeout")} if baseline else {}
    flags = argparse.Namespace(**{**vars(args), "model": ",".join(job.models), "distribution": job.distribution,
                                  **data_parallel_defaults})
    cfg, hyperparameters = submission.training_hyperparameters(flags)
    region = jobs.resolve_region(args.region, args.aws_profile) or "us-east-1"
    jobs.check_distribution(job.distribution, job.instance_type, job.instance_count, args.framework_version,
                            args.py_version, cfg.backend, cfg.device, region)
    return jobs.JobSpec(job_name=jobs.check_job_name(job.job_name), instance_type=job.instance_type,
                        instance_count=job.instance_count, distribution=job.distribution,
                        framework_version=args.framework_version, py_version=args.py_version,
                        hyperparameters=hyperparameters, region=region, role=None,
                        bucket=jobs.check_bucket(args.bucket) if args.bucket else None, s3_data=None, spot=args.spot,
                        max_run=args.max_run, max_wait=2 * args.max_run if args.spot else None)


def prepare_submission(boto: boto3.Session, specs: list[jobs.JobSpec], role: str, upload: jobs.DataUpload | None,
                       s3_data: str | None) -> None:
    """Role, bucket and data (uploaded once, or --s3-data checked) for every new job."""
    from hpml.platforms.sagemaker import jobs

    bucket = jobs.ensure_bucket(boto, specs[0].bucket)
    if upload:
        s3_data = jobs.upload_data(boto, bucket, upload)
    elif s3_data:
        jobs.check_s3_data(boto, s3_data)
    for spec in specs:
        spec.role, spec.bucket, spec.s3_data = role, bucket, s3_data


def wait_for_jobs(boto: boto3.Session, new: list[jobs.JobSpec], earlier: list[tuple[str, tuple[str, int]]],
                  max_jobs: int, warm_setups: set[tuple[str, int]],
                  session: sagemaker.session.Session | None) -> list[dict]:
    """Submit the new jobs in order, at most `max_jobs` running at a time (the earlier ones, by (name, instance
    setup), count), and wait until every job has ended; their final descriptions. A job on a setup of `warm_setups`
    waits while another job of its setup runs, so that it starts on that job's warm instances."""
    from hpml.platforms.sagemaker import jobs

    pending, active, ended = list(new), dict(earlier), []
    while pending or active:
        for spec in list(pending):
            setup = (spec.instance_type, spec.instance_count)
            if len(active) >= max_jobs:
                break
            if setup in warm_setups and setup in active.values():
                continue
            jobs.submit(spec, session)
            print(f"submitted {spec.job_name} ({jobs.console_url(spec.region, spec.job_name)})")
            pending.remove(spec)
            active[spec.job_name] = setup
        finished = [description for description in (jobs.describe(boto, name) for name in active)
                    if description["TrainingJobStatus"] in jobs.ENDED]
        for description in finished:
            del active[description["TrainingJobName"]]
            print(f"{description['TrainingJobName']}: {description['TrainingJobStatus']}")
        ended += finished
        if active and not finished:
            time.sleep(POLL_S)
    return ended


def draw_finished(cells: list[matrix.Cell], cfg: TrainConfig, output_dir: Path, figures_dir: Path,
                  trained_on: str | None = None) -> int:
    """Draw every result in the output folder; exit code 0 only when every cell of the study has its results."""
    missing = matrix.cells_to_run(cells, draw(output_dir, figures_dir), cfg, trained_on=trained_on)
    print(f"{len(cells) - len(missing)} of {cli.count(len(cells), 'cell')} finished"
          + (f"; no results yet for {', '.join(map(str, missing))}" if missing else ""))
    return 1 if missing else 0


def build_parser(parser_class: type[cli.ArgumentParser] = cli.ArgumentParser) -> cli.ArgumentParser:
    parser = parser_class(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runs = parser.add_argument_group("the study")
    runs.add_argument("--models", default="all", help="'all' or a comma list of the names --model of "
                        "run_hpc.py takes: vgg16, resnet18, mobilenetv2, shufflenetv2, densenet121 (default: all)")
    runs.add_argument("--world-sizes", default="1,2", help="comma list of process counts (GPUs, or CPU processes "
                        "without a GPU); 1 is the single-device baseline (default: %(default)s)")
    runs.add_argument("--repeats", type=int, default=1, help="runs of every model and world size, for medians and "
                        "min-max spreads (default: %(default)s)")
    runs.add_argument("--figures-dir", default="results_img", help="folder for the figures and summary.md drawn "
                        "at the end (default: %(default)s)")
    cli.add_switch(runs, "--force", "run every cell again, even those whose results are already in --output-dir "
                                      "(with --where slurm: submit every cell again, even one whose job is still "
                                      "queued or running; with --where sagemaker: submit a new attempt of every job)")
    cli.add_switch(runs, "--dry-run", "print the command (with --where slurm: the batch script) of every cell "
                                        "still to run, and run or submit nothing")
    runs.add_argument("--where", choices=("local", "slurm", "sagemaker"), default="local",
                        help="local: every cell in turn on this machine; slurm: one sbatch script per cell, "
                             "submitted with sbatch; a re-run submits again a cell without results whose job "
                             "failed (FAILED, CANCELLED, TIMEOUT, ...) or is unknown to SLURM, not one still queued, "
                             "running or COMPLETED; sagemaker: SageMaker training jobs (default: %(default)s)")
    cli.add_switch(runs, "--collect", "--where slurm: draw whatever cells have finished, and say which have not; "
                                        "submits nothing (run without --collect to resubmit failed cells)")
    add_slurm_args(parser)
    add_sagemaker_args(parser)
    cli.add_training_args(parser, leave_out=("--model",))
    cli.add_distributed_args(parser)
    return parser


def add_slurm_args(parser: argparse.ArgumentParser) -> None:
    cluster = parser.add_argument_group(
        "SLURM (--where slurm)",
        "  A job per cell: one node when its world size fits --processes-per-node, else whole nodes of it; srun\n"
        "  starts one torchrun per node. Each flag that names something goes into an #SBATCH line of the script.")
    cluster.add_argument("--gpus-per-node", type=int, default=4, help="GPUs of a node, one per training process; 0: "
                         "CPU nodes, and no GPUs asked for (default: %(default)s)")
    cluster.add_argument("--processes-per-node", type=int, help="training processes of a node, at most (with GPUs, "
                         "up to --gpus-per-node); a world size above it fills whole nodes of it (default: "
                         "--gpus-per-node, or 1 on CPU nodes: world size 2 is 2 nodes of 1 process)")
    cluster.add_argument("--cpus-per-task", type=int, help="CPUs of a node's task (its torchrun and processes), "
                         f"shared out as OMP_NUM_THREADS (default: {slurm.CPUS_PER_GPU} per GPU, or 1 per process "
                         "on CPU nodes)")
    cluster.add_argument("--time-limit", default="01:00:00",
                         help="each job's sbatch --time, e.g. 30:00 or 1-00:00:00 (default: %(default)s)")
    cluster.add_argument("--partition", help="sbatch --partition: a partition, or a comma list of them")
    cluster.add_argument("--account", help="sbatch --account: the account the jobs are charged to")
    cluster.add_argument("--qos", help="sbatch --qos: the jobs' quality of service")
    cluster.add_argument("--constraint", help="sbatch --constraint: node features, e.g. 'a100|h100'")
    cluster.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION", help="one more option for "
                         "sbatch's command line, as given, with its value in the same argument: "
                         "--sbatch-arg=--mem=32G --sbatch-arg=--exclusive (repeatable)")
    cluster.add_argument("--setup", action="append", default=[], metavar="SHELL", help="shell lines each job runs "
                         "before training, written into its script as given (repeatable): --setup 'module load "
                         "cuda' --setup 'source venv/bin/activate'. With --setup the jobs run the `python` on the "
                         "PATH it leaves; without, the python running run_study.py, by its full path (default: "
                         "none)")


def add_sagemaker_args(parser: argparse.ArgumentParser) -> None:
    cloud = parser.add_argument_group(
        "SageMaker (--where sagemaker)",
        "  The data comes from --s3-data or --data-dir. --dry-run prints every job with its instances, GPU model and\n"
        "  estimated time and cost, and sends nothing. A job trains every model in turn (--job-per-model: one\n"
        "  each). A re-run picks up the jobs submitted before; one whose latest attempt ended without results for\n"
        "  some models is submitted again as <name>-t2, -t3, ... with just those, and with --force every job is.")
    gpus = ", ".join(f"{name} ({count} × {gpu})" for name, (count, gpu) in plan.INSTANCE_GPUS.items())
    cloud.add_argument("--instance-type", default="ml.p3.16xlarge", help="instance type of the SMDDP and "
                       "torchrun jobs; a world size must fill whole instances; SMDDP runs on ml.p3.16xlarge, "
                       f"ml.p3dn.24xlarge, ml.p4d.24xlarge and ml.p4de.24xlarge. Known types: {gpus} "
                       "(default: %(default)s)")
    cloud.add_argument("--baseline-instance-type", default="ml.p3.2xlarge", help="instance type of the "
                       "single-GPU baseline jobs (run_hpc.py on one GPU), with the GPU model of --instance-type, "
                       "so that speedups compare world sizes, not GPUs: a one-GPU type, or one GPU of a multi-GPU "
                       "type such as --instance-type itself (the whole instance is billed) (default: %(default)s)")
    cloud.add_argument("--framework-version", help="PyTorch version of SageMaker's training container (default: "
                       "that of submission.py submit)")
    cloud.add_argument("--py-version", help="Python version of that container (default: that of "
                       "submission.py submit)")
    cloud.add_argument("--role", metavar="ARN", help="IAM role the jobs run as (default: $HPML_SAGEMAKER_ROLE)")
    cloud.add_argument("--bucket", help="S3 bucket for code, data and outputs (default: the account's SageMaker "
                       "bucket)")
    cloud.add_argument("--s3-data", metavar="S3_URI", help="CIFAR-10 already in S3 (default: upload --data-dir)")
    cli.add_switch(cloud, "--spot", "managed spot training (cheaper, may be interrupted and resumed)")
    cloud.add_argument("--max-run", type=int, default=7200, metavar="SECONDS", help="stop each job after this much "
                       "training time; also the bound of the cost estimate (default: %(default)s)")
    cloud.add_argument("--max-jobs", type=int, help="jobs running at once, those of an earlier run still running "
                       "included (default: what the account's SageMaker quota '<instance type> for training job "
                       "usage' allows the study's jobs, read from Service Quotas; 1 where it does not answer)")
    cli.add_switch(cloud, "--job-per-model", "a job for each model, as before packed jobs, instead of one job per "
                                             "distribution and instance setup that trains every model in turn")
    cloud.add_argument("--keep-alive", type=int, default=KEEP_ALIVE_S, metavar="SECONDS",
                       help="on-demand jobs ask SageMaker to keep their instances warm this long for the next job "
                            "on the same instance type and count (a managed warm pool, billed while kept; the last "
                            "job of a setup keeps none); within the account's warm pool quota; 0: off; at most "
                            f"{WARM_POOL_MAX_S} (default: %(default)s)")
    cloud.add_argument("--epoch-seconds", type=float, metavar="SECONDS", help="the time per epoch, of every model "
                       "and world size, to estimate time and cost from when neither a collected job of the same model "
                       "and instances nor --throughput gives one (default: none)")
    cloud.add_argument("--throughput", type=cli.path_flag, metavar="FILE", help="a bench/throughput.py --json "
                       "file: one GPU's images/s per model (and its DDP scaling, where measured) to estimate times "
                       "per epoch from (default: none)")
    cloud.add_argument("--startup-minutes", type=float, default=6.0, help="the start-up the plan assumes for a job on "
                       "new instances: provisioning, container image and data (default: %(default)s)")
    cloud.add_argument("--warm-startup-minutes", type=float, default=1.0, help="the start-up the plan assumes for a "
                       "job on the warm instances of the job before it (default: %(default)s)")
    cloud.add_argument("--spot-savings", type=float, default=70.0, metavar="PERCENT", help="how much below on-demand "
                       "prices the plan assumes spot training bills, in percent (default: %(default)s)")
    cli.add_switch(cloud, "--yes", "submit without asking")
    cli.add_aws_flags(cloud)


def draw(output_dir: Path, figures_dir: Path) -> list[dict]:
    """The figures and summary.md of every result in the output folder, when there is one; the results."""
    records, _ = results.load_all(output_dir)
    if records:
        from hpml.study import plots  # only now: importing matplotlib takes a moment

        plots.make_all(output_dir, figures_dir)
    return records

