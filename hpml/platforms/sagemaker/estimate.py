"""How long and how much a SageMaker study's jobs will take: estimates, printed with what they assume. No AWS calls.

A job's training time is, for each of its models, --epochs times a time per epoch: measured by collected runs of
the same model, world size and instance type; else from a throughput file (bench/throughput.py --json: one GPU's
images/s, and its DDP scaling efficiency where it measured that world size, else perfect scaling); else stated by
--epoch-seconds. Each job also waits for its start-up (instances, container image and data): an assumed figure, less
on the warm instances of the job before it. The study's wall time comes from running the jobs in order, at most
--max-jobs at once, as run_study.py submits them; its cost from training time and hpml/platforms/sagemaker/prices.py.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

from hpml import cli
from hpml.config import TrainConfig
from hpml.data import CIFAR10_TRAIN_SIZE
from hpml.errors import UsageError, one_line
from hpml.platforms.sagemaker import prices
from hpml.platforms.sagemaker.plan import PlannedJob, Step, warm_successors
from hpml.study.matrix import duration


@dataclass(frozen=True)
class Throughput:
    """Images per second of one GPU per model, and DDP scaling efficiencies by world size, from a
    bench/throughput.py --json file."""

    path: Path
    device: str
    images_per_s: dict[str, float]
    efficiency: dict[int, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Throughput:
        """The file's figures; UsageError naming --throughput and what is wrong with it."""
        try:
            report = json.loads(path.read_text())
            images_per_s = {name: float(figures["fast_images_per_s"]) for name, figures in report["models"].items()}
            ddp = report.get("ddp") or {}
            efficiency = {int(ddp["nproc"]): {name: float(figures["scaling_efficiency"])
                                              for name, figures in ddp["models"].items()}} if ddp else {}
            device = str(report["device"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise UsageError(f"--throughput {path}: not a bench/throughput.py --json file ({type(error).__name__}: "
                             f"{one_line(error)})") from None
        if not all(0 < rate < float("inf") for rate in images_per_s.values()):
            raise UsageError(f"--throughput {path}: images per second must be positive numbers")
        return cls(path, device, images_per_s, efficiency)

    def epoch_seconds(self, model: str, world_size: int, images: int) -> tuple[float, str] | None:
        """A training epoch's seconds at this world size, and how it was found; None without the model's figure."""
        if model not in self.images_per_s:
            return None
        measured = self.efficiency.get(world_size, {}).get(model)
        scaling = (f"{measured:.0%} scaling measured" if measured else "perfect scaling assumed") \
            if world_size > 1 else "one GPU"
        rate = self.images_per_s[model] * world_size * (measured or 1.0)
        return images / rate, f"{self.path} ({self.device}; {scaling})"


@dataclass(frozen=True)
class Assumptions:
    """What the estimates take as given."""

    epochs: int
    train_images: int
    stated_epoch_s: float | None
    throughput: Throughput | None
    cold_startup_s: float
    warm_startup_s: float
    spot_savings_percent: float
    max_run: int
    handover_s: float  # how long a warm instance waits, billed, for the next job to be submitted

    @classmethod
    def of(cls, cfg: TrainConfig, stated_epoch_s: float | None, throughput: Throughput | None,
           startup_minutes: float, warm_startup_minutes: float, spot_savings_percent: float, max_run: int,
           handover_s: float) -> Assumptions:
        return cls(cfg.epochs, cfg.subset or CIFAR10_TRAIN_SIZE, stated_epoch_s, throughput, startup_minutes * 60,
                   warm_startup_minutes * 60, spot_savings_percent, max_run, handover_s)

    def lines(self) -> list[str]:
        """The assumptions, printed beside the numbers."""
        return [f"start-up: {self.cold_startup_s / 60:g} min per job on new instances, {self.warm_startup_s / 60:g} "
                "min on warm ones (not measured: --startup-minutes, --warm-startup-minutes)",
                f"time: {self.epochs} epochs of {self.train_images:,} images per model; evaluation and checkpoints "
                "not counted",
                f"prices: {prices.PRICE_SOURCE}; a job is billed for its training time here, not for its start-up",
                f"spot: {self.spot_savings_percent:g}% below on demand (--spot-savings; SageMaker's spot "
                "savings vary with instance type, region and time), waiting for spot capacity not counted",
                f"warm pools: each hand-over keeps the instances billed ~{self.handover_s:g} s while the next job is "
                "submitted"]


def measured_epoch_seconds(model: str, world_size: int, instance_type: str, records: list[dict]) -> float | None:
    """The median time per epoch of collected SageMaker runs of the same model, world size and instance type."""
    times = [record["median_epoch_time_s"] for record in records
             if record["model"] == model and int(record["world_size"]) == world_size
             and (record.get("sagemaker") or {}).get("instance_type") == instance_type
             and "median_epoch_time_s" in record]
    return statistics.median(times) if times else None


def epoch_seconds(model: str, job: PlannedJob, assumptions: Assumptions,
                  records: list[dict]) -> tuple[float, str] | None:
    """A model's time per epoch in this job and where it came from: measured, a throughput file, or stated."""
    measured = measured_epoch_seconds(model, job.world_size, job.instance_type, records)
    if measured:
        return measured, "measured by collected jobs"
    from_file = assumptions.throughput and assumptions.throughput.epoch_seconds(model, job.world_size,
                                                                               assumptions.train_images)
    if from_file:
        return from_file
    return (assumptions.stated_epoch_s, "stated by --epoch-seconds") if assumptions.stated_epoch_s else None


@dataclass(frozen=True)
class JobEstimate:
    """A job's training seconds (None: some model has no time per epoch), where the times came from, and its
    on-demand cost (None without a price or a time)."""

    training_s: float | None
    sources: str
    cut: bool  # the training would outlast --max-run: SageMaker stops it there
    on_demand_usd: float | None


def estimate_job(job: PlannedJob, assumptions: Assumptions, records: list[dict]) -> JobEstimate:
    found = {model: epoch_seconds(model, job, assumptions, records) for model in job.models}
    unknown = [model for model, value in found.items() if value is None]
    if unknown:
        return JobEstimate(None, f"no time per epoch for {', '.join(unknown)} (--epoch-seconds or --throughput)",
                           False, None)
    wanted = sum(assumptions.epochs * seconds for seconds, _ in found.values())
    training = min(wanted, assumptions.max_run)
    cost = prices.instances_cost_usd(job.instance_type, job.instance_count, training)
    sources = "; ".join(dict.fromkeys(source for _, source in found.values()))
    return JobEstimate(training, sources, wanted > assumptions.max_run, cost)


def wall_seconds(jobs: list[tuple[Hashable, float]], max_jobs: int, cold_s: float, warm_s: float,
                 warm_setups: set) -> float:
    """How long jobs of (instance setup, training seconds) take, started in order, at most `max_jobs` at once. A job
    on a setup in `warm_setups` waits while another job of its setup runs, then starts warm on its instances."""
    pending, running, now, ended = list(jobs), [], 0.0, 0.0
    warm: set = set()  # setups whose last job has just ended, its instances warm
    while pending:
        for setup, training in list(pending):
            if len(running) >= max_jobs:
                break
            if setup in warm_setups and any(other == setup for _, other in running):
                continue
            startup = warm_s if setup in warm else cold_s
            warm.discard(setup)
            running.append((now + startup + training, setup))
            pending.remove((setup, training))
        now = min(end for end, _ in running)
        for end, setup in [job for job in running if job[0] <= now]:
            running.remove((end, setup))
            ended = max(ended, end)
            if setup in warm_setups:
                warm.add(setup)
    return max([ended, *(end for end, _ in running)])


def job_lines(step: Step, estimate: JobEstimate | None, assumptions: Assumptions, warm_from: str | None,
              keeps_warm_for: str | None, keep_alive: int) -> list[str]:
    """A job of the plan: its name and state, instances, models, and the estimate of its time and cost."""
    job = step.job
    lines = [f"{step.latest or job.job_name}: {step.status}; {job.hardware}, {job.distribution}",
             f"  models: {', '.join(job.models)}"]
    if not step.submit:
        return lines
    startup = f"start-up ~{duration(assumptions.cold_startup_s)}" + (
        f", or ~{duration(assumptions.warm_startup_s)} on the warm instances of {warm_from}" if warm_from else "")
    bound = prices.instances_cost_usd(job.instance_type, job.instance_count, assumptions.max_run)
    at_most = f"at most ${bound:,.2f} (--max-run {assumptions.max_run} s)" if bound is not None else \
        f"no price for {job.instance_type} in hpml/platforms/sagemaker/prices.py"
    if estimate.training_s is None:
        lines.append(f"  estimate: {estimate.sources}; {startup}; {at_most}")
    else:
        cut = " (cut there by --max-run)" if estimate.cut else ""
        cost = "" if estimate.on_demand_usd is None else \
            f", ~${estimate.on_demand_usd:,.2f} on demand, ~${spot(estimate.on_demand_usd, assumptions):,.2f} on spot"
        lines.append(f"  estimate: training ~{duration(estimate.training_s)}{cut} (time per epoch {estimate.sources}), "
                     f"{startup}{cost}; {at_most}")
    if keeps_warm_for:
        lines.append(f"  keeps its instances warm up to {keep_alive} s for {keeps_warm_for}")
    return lines




def spot(on_demand_usd: float, assumptions: Assumptions) -> float:
    return on_demand_usd * (1 - assumptions.spot_savings_percent / 100)


def study_lines(jobs: list[PlannedJob], estimates: list[JobEstimate], assumptions: Assumptions, max_jobs: int,
                warm_setups: set, warm_note: str | None) -> list[str]:
    """The whole study's wall time under `max_jobs`, with and without warm pools, and its cost on demand and on
    spot; or what is missing to estimate them."""
    bounds = [prices.instances_cost_usd(job.instance_type, job.instance_count, assumptions.max_run) for job in jobs]
    bound = f"at most ${sum(b for b in bounds if b is not None):,.2f} on demand (the --max-run bound)" + (
        "" if None not in bounds else ", leaving out the jobs with no price")
    lines = [f"study, {len(jobs)} jobs to submit: {bound}"] + ([f"  warm pools: {warm_note}"] if warm_note else [])
    unknown = [job.job_name for job, estimate in zip(jobs, estimates, strict=True) if estimate.training_s is None]
    if unknown:
        return [*lines, f"  no estimate of the study's time and cost: no time per epoch for {', '.join(unknown)}"]
    timed = [(job.setup, estimate.training_s) for job, estimate in zip(jobs, estimates, strict=True)]
    with_warm_setups = warm_setups or {job.setup for job in jobs}
    handing_over = [job for job in jobs if job.job_name in warm_successors(jobs, with_warm_setups)]
    times = [wall_seconds(timed, max_jobs, assumptions.cold_startup_s, assumptions.warm_startup_s, setups)
             for setups in (with_warm_setups, set())]
    costs = [estimate.on_demand_usd for estimate in estimates]
    if None in costs:
        cost = "no cost estimate: no price for " + ", ".join(
            sorted({job.instance_type for job, value in zip(jobs, costs, strict=True) if value is None}))
    else:
        kept = sum(prices.instances_cost_usd(job.instance_type, job.instance_count, assumptions.handover_s)
                   for job in handing_over)
        cost = (f"~${sum(costs):,.2f} on demand without warm pools, ~${sum(costs) + kept:,.2f} with them "
                f"({cli.count(len(handing_over), 'hand-over')}); ~${spot(sum(costs), assumptions):,.2f} on spot")
    hypothetical = "" if warm_setups else " if they could be used"
    lines += [f"  wall time (an estimate, {cli.count(max_jobs, 'job')} at a time): "
              f"~{duration(times[0])} with warm pools{hypothetical}, ~{duration(times[1])} without",
              f"  cost (an estimate): {cost}"]
    return lines
