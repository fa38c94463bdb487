"""A study's cells as SageMaker training jobs, and which of them a re-run submits: no AWS calls, no torch.

World size 1 is the single-GPU baseline (--distribution none: run_hpc.py on one GPU); a larger world size is two
jobs on the same whole instances, SMDDP and torchrun-NCCL, so that both are compared on the same hardware. The
baseline runs on the data-parallel jobs' GPU model, or speedups would compare GPU models as well as world sizes: by
default one GPU of ml.p3.2xlarge against the eight of ml.p3.16xlarge (NVIDIA V100 16 GB both). The baseline may
also take one GPU of a multi-GPU instance, e.g. of the data-parallel instance type itself; it is billed for the
whole instance.

A job trains every model of the study in turn (the training scripts take --model a,b,...), so the study pays each
job's start-up once per instance setup, not once per model; --job-per-model makes a job of each model instead.

Job names are fixed by the cells and their settings, so a re-run finds the jobs it already submitted. SageMaker never
takes a job name twice, so a job is tried again under its name with -t2, -t3, ... appended: the latest attempt
decides whether a job is running or ended, and the results collected from its attempts which models a next attempt
still has to train."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import NamedTuple

from hpml.config import TrainConfig
from hpml.errors import UsageError
from hpml.study.matrix import Cell, settings_id

DATA_PARALLEL = ("smddp", "torchrun")
# Training job statuses after which SageMaker has uploaded the output; a job's models without results are trained
# again after them.
ENDED = ("Completed", "Stopped", "Failed")
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
    """One attempt at one SageMaker training job of the study: the cells it trains one after another (one world
    size and repeat, one model each), on one setup of instances."""

    cells: tuple[Cell, ...]
    distribution: str  # none (the baseline), smddp or torchrun
    instance_type: str
    instance_count: int
    settings: str  # a short hash of the cells' defining settings (and models): part of the job name
    per_model: bool = False  # --job-per-model: one model, named in the job name
    attempt: int = 1

    @property
    def models(self) -> list[str]:
        return [cell.model for cell in self.cells]

    @property
    def world_size(self) -> int:
        return self.cells[0].world_size

    @property
    def setup(self) -> tuple[str, int]:
        """What a warm pool must match: the instance type and count."""
        return self.instance_type, self.instance_count

    @property
    def base_name(self) -> str:
        """The job's name at its first attempt."""
        model = f"{self.cells[0].model}-" if self.per_model else ""
        return (f"hpml-{model}{self.distribution}-w{self.world_size}-r{self.cells[0].repeat + 1}"
                f"-{self.settings}")

    @property
    def job_name(self) -> str:
        return self.base_name if self.attempt == 1 else f"{self.base_name}-t{self.attempt}"

    @property
    def hardware(self) -> str:
        """Instances and the GPUs the job uses, e.g. 'ml.p3.16xlarge × 2, 16 × NVIDIA V100 (16 GB)'."""
        gpus, gpu = INSTANCE_GPUS[self.instance_type]
        if self.world_size < gpus:
            return f"{self.instance_type} × 1, 1 of its {gpus} {gpu} GPUs (the whole instance is billed)"
        return f"{self.instance_type} × {self.instance_count}, {self.world_size} × {gpu}"


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


class JobKey(NamedTuple):
    """What makes cells one job: its distribution, instances, world size and repeat (and model, one job per model)."""

    distribution: str
    instance_type: str
    instance_count: int
    world_size: int
    repeat: int
    model: str  # "" when the job trains every model


def plan_jobs(cells: list[Cell], cfg: TrainConfig, instance_type: str, baseline_type: str,
              per_model: bool = False) -> list[PlannedJob]:
    """Every job of the study: one per distribution, instance setup and repeat, training its models in turn (with
    `per_model`, one per model as well), ordered so that jobs on the same instance setup follow one another (a job
    can then start on the warm instances of the one before). UsageError naming a GPU model mismatch or a world size
    that does not fill whole instances."""
    check_same_gpu(baseline_type, instance_type)
    gpus, _ = INSTANCE_GPUS[instance_type]
    groups: dict[JobKey, list[Cell]] = {}
    for cell in cells:
        if cell.world_size > 1 and cell.world_size % gpus:
            raise UsageError(f"--world-sizes {cell.world_size} does not fill whole {instance_type} instances of "
                             f"{gpus} GPUs; use 1 or a multiple of {gpus}")
        placements = [("none", baseline_type, 1)] if cell.world_size == 1 else [
            (distribution, instance_type, cell.world_size // gpus) for distribution in DATA_PARALLEL]
        for placement in placements:
            key = JobKey(*placement, cell.world_size, cell.repeat, cell.model if per_model else "")
            groups.setdefault(key, []).append(cell)
    setups = list(dict.fromkeys((key.instance_type, key.instance_count) for key in groups))
    order = sorted(groups, key=lambda key: (setups.index((key.instance_type, key.instance_count)), key.world_size,
                                            key.repeat))
    planned = []
    for key in order:
        models = [] if per_model else [cell.model for cell in groups[key]]
        planned.append(PlannedJob(tuple(groups[key]), key.distribution, key.instance_type, key.instance_count,
                                  settings_id(cfg, groups[key][0], key.instance_type, *models), per_model))
    return planned


def attempt_of(job: PlannedJob, name: str) -> int | None:
    """Which attempt at the planned job a SageMaker job name is; None for another job's name."""
    if name == job.base_name:
        return 1
    match = re.fullmatch(rf"{re.escape(job.base_name)}-t(\d+)", name)
    return int(match[1]) if match else None


def models_with_results(job: PlannedJob, records: list[dict]) -> set[str]:
    """The job's models whose results some attempt at it brought back (collected into `records`)."""
    return {record["model"] for record in records
            if (name := (record.get("sagemaker") or {}).get("job_name")) and attempt_of(job, name)}


def next_step(job: PlannedJob, known: dict[str, dict], done: set[str], force: bool) -> Step:
    """The latest attempt SageMaker knows (`known`: descriptions by job name) decides: still running, it is picked
    up; ended, with results for every model (`done`), it is too; ended with models missing (failed, stopped, cut by
    --max-run), the next attempt trains just those; with `force`, the next attempt trains every model."""
    attempts = {number: description for name, description in known.items() if (number := attempt_of(job, name))}
    missing = tuple(cell for cell in job.cells if cell.model not in done)
    if not attempts:
        return Step(replace(job, cells=missing or job.cells), True, "new", None)
    latest, description = max(attempts.items())
    status, latest_name = description["TrainingJobStatus"], replace(job, attempt=latest).job_name
    if force:
        again = replace(job, attempt=latest + 1)
        return Step(again, True, f"{status} before, --force: submitting again as {again.job_name}", latest_name)
    if status not in ENDED or not missing:
        return Step(replace(job, attempt=latest), False, status, latest_name)
    again = replace(job, cells=missing, attempt=latest + 1)
    if len(missing) == len(job.cells):
        return Step(again, True, f"{status} before{failure_reason(description)}, submitting again as "
                                 f"{again.job_name}", latest_name)
    return Step(again, True, f"{status} before{failure_reason(description)} with no results for "
                             f"{', '.join(again.models)} ({len(missing)} of {len(job.cells)} models): submitting "
                             f"{'it' if len(missing) == 1 else 'them'} alone as {again.job_name}", latest_name)


def next_steps(planned: list[PlannedJob], known: dict[str, dict], records: list[dict], force: bool) -> list[Step]:
    return [next_step(job, known, models_with_results(job, records), force) for job in planned]


def failure_reason(description: dict) -> str:
    """' (SageMaker's FailureReason on one line, cut short)', or '' when it gave none."""
    text = " ".join(str(description.get("FailureReason") or "").split())
    if len(text) > REASON_CHARS:
        text = text[:REASON_CHARS - 1] + "…"
    return f" ({text})" if text else ""


def warm_successors(jobs: list[PlannedJob], warm_setups: set[tuple[str, int]]) -> dict[str, str]:
    """For each job (by name) on a setup in `warm_setups` that a later job of the list shares, that next job's name:
    the one it keeps its instances warm for. The last job of a setup keeps none, and pays for no idle instances."""
    following: dict[str, str] = {}
    for index, job in enumerate(jobs):
        later = next((other for other in jobs[index + 1:] if other.setup == job.setup), None)
        if later and job.setup in warm_setups:
            following[job.job_name] = later.job_name
    return following
