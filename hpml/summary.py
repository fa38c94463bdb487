"""Results grouped for comparison, and the summary table: no drawing, no torch, no matplotlib.

Runs are grouped by model, mode, backend, world size, nodes, platform (a SageMaker job or a machine of one's own),
device type and workload (data set, its size and the number of epochs), so a CPU smoke run never shares a median
with a GPU run. A group's numbers are medians over its repeated runs, with their min-max. A distributed
group's speedup is the median training time of the single-device group (run_hpc.py, mode single) with the same
model, platform, device type and workload divided by its own median: SageMaker runs against the SageMaker baseline,
local runs against the local one; with the grouping above there is at most one such group. Scaling efficiency is
speedup / world size.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import models

from . import cli
from .config import DDP_BUCKET_CAP_MB

DATASET_NAMES = {"cifar10": "CIFAR-10", "synthetic": "synthetic data (not CIFAR-10)"}
# Config values that should be equal within a group; a mix is reported, since the median would blur it.
CHECKED_SETTINGS = ("batch_size", "lr", "optimizer", "schedule")


@dataclass(frozen=True)
class Spread:
    """Median of repeated runs, with their minimum and maximum."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        values = list(values)
        return cls(statistics.median(values), min(values), max(values))

    def scaled(self, factor: float) -> Spread:
        return Spread(self.median * factor, self.low * factor, self.high * factor)

    def text(self, fmt: str) -> str:
        if self.low == self.high:
            return format(self.median, fmt)
        return f"{self.median:{fmt}} ({self.low:{fmt}}–{self.high:{fmt}})"


@dataclass
class Group:
    """Repeated runs of one configuration."""

    model: str
    mode: str
    backend: str | None
    world_size: int
    nodes: int
    device: str
    workload: str
    platform: str = "local"
    communication: str = ""  # how DDP sent gradients, where not as DDP does by default
    runs: list[dict] = field(default_factory=list)
    baseline: Group | None = None
    compared: bool = False  # a single-device group that some other group's speedup is measured against

    @property
    def setup(self) -> tuple[str, str, str]:
        """What must match for two groups to be compared: platform, device type and workload. One panel each."""
        return (self.platform, self.device, self.workload)

    @property
    def series(self) -> tuple:
        """How the runs were spread over devices: one colour per series in every figure, single first."""
        return (self.mode != "single", self.device, self.world_size, self.nodes, self.backend or "", self.mode,
                self.communication)

    def spread(self, name: str) -> Spread:
        return Spread.of(run[name] for run in self.runs)

    @property
    def speedup(self) -> float | None:
        if self.baseline is None or self.baseline is self:
            return None
        return self.baseline.spread("total_train_time_s").median / self.spread("total_train_time_s").median

    @property
    def efficiency(self) -> float | None:
        speedup = self.speedup
        return None if speedup is None else speedup / self.world_size

    @property
    def time_to_target(self) -> Spread | None:
        """Training time to the target accuracy, when every run had the same target and reached it."""
        targets = {run.get("target_acc") for run in self.runs}
        if len(targets) != 1 or None in targets or any(run.get("time_to_target_s") is None for run in self.runs):
            return None
        return self.spread("time_to_target_s")

    @property
    def target_speedup(self) -> float | None:
        """Speedup in time to the target accuracy: the honest one when a larger global batch learns more slowly."""
        if self.baseline is None or self.baseline is self:
            return None
        mine, theirs = self.time_to_target, self.baseline.time_to_target
        if mine is None or theirs is None or self.runs[0]["target_acc"] != self.baseline.runs[0]["target_acc"]:
            return None
        return theirs.median / mine.median

    @property
    def epochs(self) -> int:
        return len(self.runs[0]["epochs"])

# ---- grouping ----------------------------------------------------------------------------------

def workload_of(record: dict) -> str:
    """The data and length of a run: what must match for two runs to be compared."""
    data = record.get("data") or {}
    description = data.get("description") or record["config"].get("dataset", "unknown data")
    sizes = f"{data['train_size']:,} train / {data['test_size']:,} test images, " if "train_size" in data else ""
    return f"{description}; {sizes}{len(record['epochs'])} epochs"


def communication_of(record: dict) -> str:
    """A data-parallel run's gradient communication where it is not DDP's default: "fp16, 1 MB buckets"."""
    config = record["config"]
    if record["mode"] == "single":
        return ""
    parts = [config["grad_compression"]] if config.get("grad_compression", "none") != "none" else []
    if config.get("bucket_cap_mb", DDP_BUCKET_CAP_MB) != DDP_BUCKET_CAP_MB:
        parts.append(f"{config['bucket_cap_mb']:g} MB buckets")
    if config.get("static_graph"):
        parts.append("static graph")
    return ", ".join(parts)


def platform_of(record: dict) -> str:
    """Where a run trained: "SageMaker" (a SageMaker job) or "local" (a machine or cluster of one's own)."""
    return "SageMaker" if record.get("sagemaker") else "local"


def model_order(name: str) -> tuple[int, str]:
    """The study's order (vgg16, resnet18, ...), then any other model by name."""
    known = models.names()
    return (known.index(name) if name in known else len(known), name)


def group_runs(records: list[dict], warn: Callable[[str], None]) -> list[Group]:
    """Groups ordered by setup, model and series, with baselines attached."""
    groups: dict[tuple, Group] = {}
    for record in records:
        group = Group(model=record["model"], mode=record["mode"], backend=record.get("backend"),
                      world_size=int(record["world_size"]), nodes=int(record.get("nodes") or 1),
                      device=record["device"], workload=workload_of(record), platform=platform_of(record),
                      communication=communication_of(record))
        groups.setdefault((group.setup, model_order(group.model), group.series), group).runs.append(record)
    ordered = [groups[key] for key in sorted(groups)]
    for group in ordered:
        for setting in CHECKED_SETTINGS:
            values = {str(run.get(setting, run["config"].get(setting))) for run in group.runs}
            if len(values) > 1:
                warn(f"{label(group)} of {group.model} mixes runs with different {setting} "
                     f"({', '.join(sorted(values))}); its medians span them")
        group.baseline = next((other for other in ordered if other.mode == "single" and other.world_size == 1
                               and other.model == group.model and other.setup == group.setup), None)
        if group.baseline is not None and group.baseline is not group:
            group.baseline.compared = True
    return ordered


def by_setup(groups: list[Group]) -> list[list[Group]]:
    panels: dict[tuple, list[Group]] = {}
    for group in groups:
        panels.setdefault(group.setup, []).append(group)
    return list(panels.values())


def model_names(groups: list[Group]) -> list[str]:
    return sorted({group.model for group in groups}, key=model_order)


def label(group: Group) -> str:
    """How a series reads in a legend: '1 GPU (single)', '4 GPUs on 2 nodes (DDP, nccl)'."""
    nouns = ("GPU", "GPUs") if group.device == "cuda" else ("CPU process", "CPU processes")
    count = f"{group.world_size} {nouns[group.world_size > 1]}"
    if group.nodes > 1:
        count += f" on {group.nodes} nodes"
    if group.mode == "single":
        return f"{count} (single)"
    how = ", ".join(filter(None, ("DDP" if group.mode == "distributed" else group.mode, group.backend,
                                  group.communication)))
    return f"{count} ({how})"


# ---- what the numbers were measured on ---------------------------------------------------------

def hardware_of(record: dict) -> str:
    env = record.get("environment") or {}
    sagemaker = record.get("sagemaker") or {}
    where = f"SageMaker {sagemaker['instance_type']}: " if sagemaker.get("instance_type") else ""
    if record["device"] == "cuda":
        gpus = env.get("gpu_count")
        return f"{where}GPU {env.get('gpu') or 'unknown'}" + (f" ({gpus} per node)" if gpus else "")
    cores = env.get("cpu_count")
    return f"{where}CPU {env.get('cpu') or 'unknown'}" + (f" ({cores} cores)" if cores else "") + ", no GPU"


def setup_lines(groups: list[Group]) -> list[str]:
    """Footer lines naming every hardware, data set and software version behind a figure."""
    records = [run for group in groups for run in group.runs]
    hardware = sorted({hardware_of(run) for run in records})
    software = sorted({f"torch {run['environment']['torch']}" for run in records
                       if "torch" in (run.get("environment") or {})})
    batches = sorted({run.get("batch_size", run["config"].get("batch_size")) for run in records})
    lines = [f"Hardware: {'; '.join(hardware)}" + (f" · {', '.join(software)}" if software else "")]
    lines += [f"Data: {workload}" for workload in sorted({group.workload for group in groups})]
    lines.append(f"Batch: {'/'.join(map(str, batches))} images per process and step")
    return lines


def title_tag(groups: list[Group]) -> str:
    """The short form for a title: 'CPU only (AMD EPYC) · synthetic data ...' or 'GPU (NVIDIA H100) · CIFAR-10 ...'."""
    records = [run for group in groups for run in group.runs]
    gpus = sorted({(run.get("environment") or {}).get("gpu") or "GPU" for run in records if run["device"] == "cuda"})
    cpus = sorted({(run.get("environment") or {}).get("cpu") or "CPU" for run in records if run["device"] != "cuda"})
    parts = []
    if gpus:
        parts.append(f"GPU ({', '.join(gpus)})")
    if cpus:
        parts.append(f"CPU{' only' if not gpus else ''} ({', '.join(cpus)})")
    datasets = sorted({DATASET_NAMES.get(run["config"].get("dataset"), "unknown data") for run in records})
    sizes = sorted({(run.get("data") or {}).get("train_size") for run in records} - {None})
    epochs = sorted({group.epochs for group in groups})
    platforms = sorted({platform_of(run) for run in records}, key=lambda name: name != "SageMaker")
    where = f"{' and '.join(platforms)} · " if "SageMaker" in platforms else ""
    return (f"{where}{' and '.join(parts)} · {' + '.join(datasets)}"
            + (f", {'/'.join(f'{n:,}' for n in sizes)} training images" if sizes else "")
            + f" · {'/'.join(map(str, epochs))} epoch{'s' if epochs != [1] else ''}")


def short_setup(group: Group) -> str:
    """'GPU, 50,000 images, 20 epochs': tells the rows of different setups apart."""
    size = (group.runs[0].get("data") or {}).get("train_size")
    where = "SageMaker " if group.platform == "SageMaker" else ""
    return (f"{where}{'GPU' if group.device == 'cuda' else 'CPU'}, {f'{size:,} images, ' if size else ''}"
            f"{group.epochs} epochs")


# ---- summary table -----------------------------------------------------------------------------

SUMMARY_COLUMNS = ("model", "mode", "backend", "world size", "device", "epochs", "runs", "total time (s)", "images/s",
                   "speedup", "efficiency", "final acc (%)", "best acc (%)", "time to best (s)", "time to target (s)",
                   "speedup to target")


def summary_row(group: Group) -> tuple[str, ...]:
    env = group.runs[0].get("environment") or {}
    processor = env.get("gpu") if group.device == "cuda" else env.get("cpu")
    speedup, to_target, target_speedup = group.speedup, group.time_to_target, group.target_speedup
    target = group.runs[0].get("target_acc")
    return (group.model, group.mode, group.backend or "—", str(group.world_size),
            f"{group.device} ({processor})" if processor else group.device, str(group.epochs), str(len(group.runs)),
            group.spread("total_train_time_s").text(".1f"), group.spread("median_images_per_s").text(".0f"),
            "baseline" if group.compared else "—" if speedup is None else f"{speedup:.2f}×",
            "—" if speedup is None else f"{group.efficiency:.0%}",
            group.spread("final_test_acc").scaled(100).text(".1f"),
            group.spread("best_test_acc").scaled(100).text(".1f"), group.spread("time_to_best_s").text(".1f"),
            "—" if target is None else f"{to_target.text('.1f')} to {target:.0%}" if to_target else "not reached",
            "baseline" if group.compared and to_target else "—" if target_speedup is None else f"{target_speedup:.2f}×")


def summary_markdown(groups: list[Group], results_dir: Path) -> str:
    runs = cli.count(sum(len(group.runs) for group in groups), "run")
    lines = ["# hpml results summary", "",
             f"{runs} from `{results_dir}`, in {cli.count(len(groups), 'group')}. "
             "Numbers are medians over a group's runs (min–max in brackets when they differ). Speedup = median "
             "training time of the single-device group with the same model, device type and data ÷ this group's; "
             "efficiency = speedup ÷ world size. Training time excludes evaluation; images/s is the median over the "
             "epochs after the first. Time to target (--target-acc): training time until the test accuracy first "
             "reached the target, and the speedup in it, the fair measure when a larger global batch learns more "
             "slowly."]
    for panel in by_setup(groups):
        lines += ["", f"## {title_tag(panel)}", "", *(f"- {line}" for line in setup_lines(panel)), "",
                  "| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
        lines += ["| " + " | ".join(summary_row(group)) + " |" for group in panel]
    return "\n".join(lines) + "\n"
