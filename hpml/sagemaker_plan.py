"""A study's cells as SageMaker training jobs, and what they will cost: no AWS calls, no torch.

World size 1 is the single-GPU baseline (--distribution none on a one-GPU instance type); a larger world size is
two jobs on the same whole instances, SMDDP and torchrun-NCCL, so that both are compared on the same hardware.
Job names are fixed by the cell and its settings, so a re-run finds the jobs it already submitted.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from . import prices
from .config import TrainConfig
from .errors import UsageError
from .study import Cell, settings_id

# GPUs per instance of the types the study can run on (AWS's instance type pages).
GPUS_PER_INSTANCE = {
    "ml.g4dn.xlarge": 1, "ml.g4dn.12xlarge": 4, "ml.g5.xlarge": 1, "ml.g5.12xlarge": 4, "ml.g5.48xlarge": 8,
    "ml.p3.2xlarge": 1, "ml.p3.8xlarge": 4, "ml.p3.16xlarge": 8, "ml.p3dn.24xlarge": 8, "ml.p4d.24xlarge": 8,
    "ml.p4de.24xlarge": 8, "ml.p5.48xlarge": 8,
}
DATA_PARALLEL = ("smddp", "torchrun")


@dataclass(frozen=True)
class PlannedJob:
    """One SageMaker training job of the study."""

    cell: Cell
    distribution: str  # none (the baseline), smddp or torchrun
    instance_type: str
    instance_count: int
    settings: str  # a short hash of the cell's defining settings: part of the job name

    @property
    def job_name(self) -> str:
        return (f"hpml-{self.cell.model}-{self.distribution}-w{self.cell.world_size}-r{self.cell.repeat + 1}"
                f"-{self.settings}")


def gpus_per_instance(instance_type: str) -> int:
    if instance_type not in GPUS_PER_INSTANCE:
        raise UsageError(f"no GPU count known for {instance_type}; use one of {', '.join(GPUS_PER_INSTANCE)}")
    return GPUS_PER_INSTANCE[instance_type]


def plan_jobs(cells: list[Cell], cfg: TrainConfig, instance_type: str, baseline_type: str) -> list[PlannedJob]:
    """Every job of the study; UsageError naming a world size that does not fill whole instances."""
    if gpus_per_instance(baseline_type) != 1:
        raise UsageError(f"--baseline-instance-type must have one GPU (e.g. ml.p3.2xlarge), {baseline_type} has "
                         f"{gpus_per_instance(baseline_type)}")
    gpus = gpus_per_instance(instance_type)
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


def plan_table(planned: list[PlannedJob], status: dict[str, str], costs: dict[str, str], max_run: int) -> list[str]:
    """A line per job (name, instances, distribution, status: new or what SageMaker says, cost), then the bound
    on the new jobs' total cost."""
    new = [job for job in planned if job.job_name not in status]
    bound = sum(prices.cost_usd(max_run, job.instance_count, prices.hourly_price(job.instance_type) or 0.0)
                for job in new)
    return [*(f"{job.job_name}: {job.instance_type} × {job.instance_count}, {job.distribution}, "
              f"{status.get(job.job_name, 'new')}; {costs[job.job_name]}" for job in planned),
            f"new jobs: {len(new)}, at most ${bound:,.2f} in all on demand (us-east-1 prices from hpml/prices.py, "
            "which may be out of date)"]
