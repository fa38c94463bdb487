"""A study's cells as SageMaker training jobs, what they will cost, and which of them a re-run submits: no AWS
calls, no torch.

World size 1 is the single-GPU baseline (--distribution none: run_hpc.py on one GPU); a larger world size is two
jobs on the same whole instances, SMDDP and torchrun-NCCL, so that both are compared on the same hardware. The
baseline runs on the data-parallel jobs' GPU model, or speedups would compare GPU models as well as world sizes: by
default one GPU of ml.p3.2xlarge against the eight of ml.p3.16xlarge (NVIDIA V100 16 GB both). The baseline may
also take one GPU of a multi-GPU instance, e.g. of the data-parallel instance type itself; it is billed for the
whole instance.

Job names are fixed by the cell and its settings, so a re-run finds the jobs it already submitted. SageMaker never
takes a job name twice, so a job is tried again under its name with -t2, -t3, ... appended: the latest attempt
decides whether a job is done, running, or to be submitted again.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, replace

from . import prices
from .config import TrainConfig
from .errors import UsageError
from .study import Cell, settings_id

DATA_PARALLEL = ("smddp", "torchrun")
RETRIED = ("Failed", "Stopped")  # a job that ended so is submitted again; Completed, InProgress and Stopping are not
REASON_CHARS = 150  # of a failed job's FailureReason, in the plan


@dataclass(frozen=True)
class Gpu:
    """A GPU model: NVIDIA's name, its memory and its CUDA compute capability."""

    name: str
    memory_gb: int
    compute_capability: str

    def __str__(self) -> str:
        return f"NVIDIA {self.name} ({self.memory_gb} GB)"


V100_16GB, V100_32GB = Gpu("V100", 16, "7.0"), Gpu("V100", 32, "7.0")
T4, A10G = Gpu("T4", 16, "7.5"), Gpu("A10G", 24, "8.6")
A100_40GB, A100_80GB, H100 = Gpu("A100", 40, "8.0"), Gpu("A100", 80, "8.0"), Gpu("H100", 80, "9.0")

# GPUs per instance and their model, of the types the study can run on (AWS's accelerated computing instance pages).
INSTANCE_GPUS = {
    "ml.g4dn.xlarge": (1, T4), "ml.g4dn.12xlarge": (4, T4),
    "ml.g5.xlarge": (1, A10G), "ml.g5.12xlarge": (4, A10G), "ml.g5.48xlarge": (8, A10G),
    "ml.p3.2xlarge": (1, V100_16GB), "ml.p3.8xlarge": (4, V100_16GB), "ml.p3.16xlarge": (8, V100_16GB),
    "ml.p3dn.24xlarge": (8, V100_32GB),
    "ml.p4d.24xlarge": (8, A100_40GB), "ml.p4de.24xlarge": (8, A100_80GB),
    "ml.p5.48xlarge": (8, H100),
}


@dataclass(frozen=True)
class PlannedJob:
    """One attempt at one SageMaker training job of the study."""

    cell: Cell
    distribution: str  # none (the baseline), smddp or torchrun
    instance_type: str
    instance_count: int
    settings: str  # a short hash of the cell's defining settings: part of the job name
    attempt: int = 1

    @property
    def base_name(self) -> str:
        """The job's name at its first attempt."""
        return (f"hpml-{self.cell.model}-{self.distribution}-w{self.cell.world_size}-r{self.cell.repeat + 1}"
                f"-{self.settings}")

    @property
    def job_name(self) -> str:
        return self.base_name if self.attempt == 1 else f"{self.base_name}-t{self.attempt}"

    @property
    def hardware(self) -> str:
        """Instances and the GPUs the job uses, e.g. 'ml.p3.16xlarge × 2, 16 × NVIDIA V100 (16 GB)'."""
        gpus, gpu = INSTANCE_GPUS[self.instance_type]
        used = self.cell.world_size
        if used < gpus:
            return f"{self.instance_type} × 1, 1 of its {gpus} {gpu} GPUs (the whole instance is billed)"
        return f"{self.instance_type} × {self.instance_count}, {used} × {gpu}"


@dataclass(frozen=True)
class Step:
    """What a run of the study does with a planned job: pick up its latest attempt, or submit a new one."""

    job: PlannedJob  # the attempt picked up, or the one to submit
    submit: bool
    status: str  # new, the status of the attempt picked up, or why the job is submitted again
    latest: str | None  # the name of the latest attempt SageMaker knows, if any


def instance_gpus(instance_type: str, flag: str) -> tuple[int, Gpu]:
    """(GPUs per instance, their model); UsageError naming the flag when the table does not know the type."""
    if instance_type not in INSTANCE_GPUS:
        raise UsageError(f"{flag} {instance_type}: no GPU count and model known for it; use one of "
                         f"{', '.join(INSTANCE_GPUS)}")
    return INSTANCE_GPUS[instance_type]


def check_same_gpu(baseline_type: str, instance_type: str) -> None:
    """UsageError unless the baseline's GPU model is the data-parallel jobs' one, naming the pairs that would do."""
    _, baseline_gpu = instance_gpus(baseline_type, "--baseline-instance-type")
    _, gpu = instance_gpus(instance_type, "--instance-type")
    if baseline_gpu == gpu:
        return
    same = [name for name, (count, model) in INSTANCE_GPUS.items() if model == gpu and count == 1]
    raise UsageError(f"--baseline-instance-type {baseline_type} and --instance-type {instance_type} have different "
                     f"GPUs, {baseline_gpu} of compute capability {baseline_gpu.compute_capability} and {gpu} of "
                     f"{gpu.compute_capability}: speedups would compare GPU models; use --baseline-instance-type "
                     f"{' or '.join([*same, instance_type])}")


def plan_jobs(cells: list[Cell], cfg: TrainConfig, instance_type: str, baseline_type: str) -> list[PlannedJob]:
    """Every job of the study; UsageError naming a GPU model mismatch or a world size that does not fill whole
    instances."""
    check_same_gpu(baseline_type, instance_type)
    gpus, _ = INSTANCE_GPUS[instance_type]
    planned = []
    for cell in cells:
        if cell.world_size == 1:
            planned.append(PlannedJob(cell, "none", baseline_type, 1, settings_id(cfg, cell, baseline_type)))
            continue
        if cell.world_size % gpus:
            raise UsageError(f"--world-sizes {cell.world_size} does not fill whole {instance_type} instances of "
                             f"{gpus} GPUs; use 1 or a multiple of {gpus}")
        planned += [PlannedJob(cell, distribution, instance_type, cell.world_size // gpus,
                               settings_id(cfg, cell, instance_type)) for distribution in DATA_PARALLEL]
    return planned


def attempt_of(job: PlannedJob, name: str) -> int | None:
    """Which attempt at the planned job a SageMaker job name is; None for another job's name."""
    if name == job.base_name:
        return 1
    match = re.fullmatch(rf"{re.escape(job.base_name)}-t(\d+)", name)
    return int(match[1]) if match else None


def next_step(job: PlannedJob, known: dict[str, dict], force: bool) -> Step:
    """The latest attempt SageMaker knows (`known`: descriptions by job name) decides: completed or still running,
    it is picked up; failed or stopped, or any with `force`, the next attempt is submitted."""
    attempts = {number: description for name, description in known.items() if (number := attempt_of(job, name))}
    if not attempts:
        return Step(job, True, "new", None)
    latest, description = max(attempts.items())
    status, again = description["TrainingJobStatus"], replace(job, attempt=latest + 1)
    latest_name = replace(job, attempt=latest).job_name
    if force:
        return Step(again, True, f"{status} before, --force: submitting again as {again.job_name}", latest_name)
    if status in RETRIED:
        return Step(again, True, f"{status} before{failure_reason(description)}, submitting again as "
                                 f"{again.job_name}", latest_name)
    return Step(replace(job, attempt=latest), False, status, latest_name)


def next_steps(planned: list[PlannedJob], known: dict[str, dict], force: bool) -> list[Step]:
    return [next_step(job, known, force) for job in planned]


def failure_reason(description: dict) -> str:
    """' (SageMaker's FailureReason on one line, cut short)', or '' when it gave none."""
    text = " ".join(str(description.get("FailureReason") or "").split())
    if len(text) > REASON_CHARS:
        text = text[:REASON_CHARS - 1] + "…"
    return f" ({text})" if text else ""


def measured_epoch_seconds(job: PlannedJob, records: list[dict]) -> float | None:
    """The median time per epoch of collected SageMaker runs of the same model, world size and instance type."""
    times = [record["median_epoch_time_s"] for record in records
             if record["model"] == job.cell.model and int(record["world_size"]) == job.cell.world_size
             and (record.get("sagemaker") or {}).get("instance_type") == job.instance_type
             and "median_epoch_time_s" in record]
    return statistics.median(times) if times else None


def cost_line(job: PlannedJob, epochs: int, stated_epoch_s: float | None, records: list[dict], max_run: int) -> str:
    """The job's estimated cost, saying where the time per epoch came from: measured, stated, or only the bound."""
    price = prices.hourly_price(job.instance_type)
    if price is None:
        return f"no price for {job.instance_type} in hpml/prices.py"
    measured = measured_epoch_seconds(job, records)
    bound = f"at most ${prices.cost_usd(max_run, job.instance_count, price):,.2f} (--max-run {max_run} s)"
    epoch_s, source = (measured, "measured") if measured else (stated_epoch_s, "stated by --epoch-seconds")
    if epoch_s is None:
        return f"{bound}; no measured or stated time per epoch (--epoch-seconds) to estimate from"
    seconds = min(epochs * epoch_s, max_run)
    return (f"~${prices.cost_usd(seconds, job.instance_count, price):,.2f} for {epochs} × {epoch_s:.1f} s per "
            f"epoch ({source}; set-up time not included), {bound}")


def plan_table(steps: list[Step], costs: dict[str, str], max_run: int) -> list[str]:
    """A line per job (name, what happens to it, instances and GPUs, distribution, cost by base name), then the
    bound on the cost of the jobs to submit."""
    new = [step.job for step in steps if step.submit]
    bound = sum(prices.cost_usd(max_run, job.instance_count, prices.hourly_price(job.instance_type) or 0.0)
                for job in new)
    return [*(f"{step.latest or step.job.job_name}: {step.status}; {step.job.hardware}, {step.job.distribution}; "
              f"{costs[step.job.base_name]}" for step in steps),
            f"jobs to submit: {len(new)}, at most ${bound:,.2f} in all on demand (us-east-1 prices from "
            "hpml/prices.py, which may be out of date)"]
