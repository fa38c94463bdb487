"""Results grouped for comparison, and the summary table: no drawing, no torch, no matplotlib.

Runs are grouped by model, mode, backend, world size, nodes and gradient communication within a setup: platform (a
SageMaker job or a machine of one's own), hardware (the GPU or CPU model), speed settings (precision, loader, memory
layout, CUDA graphs, compile, drop-last) and workload (data set, its size and the number of epochs). Runs of
different setups never share a median or a baseline. A group's numbers are medians over its repeated runs, with
their min-max.

The headline speedup is steady-state: the baseline's median epoch time (epochs after the first, so warm-up such as
kernel selection, graph capture or compile is left out) divided by the group's, where the baseline is the
single-device group (run_hpc.py, mode single) of the same model and setup. The speedup in total training time (with
warm-up) stands beside it. Scaling efficiency is steady-state speedup / world size. A group with no such baseline
says why instead of showing a number.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import models
from hpml import cli, files, results
from hpml.config import DDP_BUCKET_CAP_MB
from hpml.study import scaling

DATASET_NAMES = {"cifar10": "CIFAR-10", "synthetic": "synthetic data (not CIFAR-10)"}
# A --profile breakdown's parts that add up to its step (step_ms); communication_ms overlaps them.
STEP_PARTS = ("compute_ms", "optimizer_ms", "data_ms", "exposed_communication_ms")
PROFILE_FIELDS = (*STEP_PARTS, "step_ms", "communication_ms", "exposed_communication_share")
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
    hardware: str = ""  # the GPU or CPU model: results.of_record
    settings: str = ""  # the speed settings: results.settings_of
    communication: str = ""  # how DDP sent gradients, where not as DDP does by default
    runs: list[dict] = field(default_factory=list)
    baseline: Group | None = None
    no_baseline: str = ""  # why a data-parallel group has no baseline to be compared with
    compared: bool = False  # a single-device group that some other group's speedup is measured against

    @property
    def setup(self) -> tuple[str, str, str, str]:
        """What must match for two groups to be compared: platform, hardware, speed settings and workload. One
        panel each."""
        return (self.platform, self.hardware, self.settings, self.workload)

    @property
    def series(self) -> tuple:
        """How the runs were spread over devices: one colour per series in every figure, single first."""
        return (self.mode != "single", self.device, self.world_size, self.nodes, self.backend or "", self.mode,
                self.communication)

    def spread(self, name: str) -> Spread:
        return Spread.of(run[name] for run in self.runs)

    @property
    def epoch_time(self) -> Spread:
        """Steady-state time per epoch: each run's median over the epochs after the first."""
        return Spread.of(steady_epoch_time(run) for run in self.runs)

    def _ratio_to_baseline(self, of: Callable[[Group], float]) -> float | None:
        if self.baseline is None or self.baseline is self:
            return None
        return of(self.baseline) / of(self)

    @property
    def speedup(self) -> float | None:
        """Steady-state speedup: the baseline's median epoch time over this group's."""
        return self._ratio_to_baseline(lambda group: group.epoch_time.median)

    @property
    def total_speedup(self) -> float | None:
        """Speedup in total training time, warm-up (the first epoch) included."""
        return self._ratio_to_baseline(lambda group: group.spread("total_train_time_s").median)

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
    def cost(self) -> Spread | None:
        """Each run's share of its SageMaker job's bill, where every run of the group has one."""
        shares = [(run.get("sagemaker") or {}).get("cost_usd") for run in self.runs]
        return None if None in shares else Spread.of(shares)

    @property
    def epochs(self) -> int:
        return len(self.runs[0]["epochs"])

    def profiled(self, part: str) -> Spread | None:
        """A part of the --profile step breakdown over the runs that have one (None when none has)."""
        values = [profile[part] for profile in map(profile_of, self.runs) if profile]
        return Spread.of(values) if values else None

    @property
    def predicted_exposed_share(self) -> float | None:
        """The scaling model's share of the profiled step spent waiting for communication: what of the measured
        communication outlasts the backward pass of the rest of the step (hpml.study.scaling.exposed_s)."""
        step, exposed, sent = (self.profiled(part) for part in ("step_ms", "exposed_communication_ms",
                                                                  "communication_ms"))
        if step is None or self.world_size == 1:
            return None
        busy = step.median - exposed.median
        predicted = scaling.exposed_s(busy, sent.median, overlap=True)
        return predicted / (busy + predicted)


def profile_of(run: dict) -> dict | None:
    """A run's --profile breakdown when it has every part a reader uses."""
    profile = run.get("profile") or {}
    return profile if all(part in profile for part in PROFILE_FIELDS) else None


def steady_epoch_time(run: dict) -> float:
    return statistics.median(epoch["epoch_time_s"] for epoch in results.steady_epochs(run["epochs"]))

# ---- grouping ----------------------------------------------------------------------------------

def workload_of(record: dict) -> str:
    """The data and length of a run: what must match for two runs to be compared."""
    data = record.get("data") or {}
    description = data.get("description") or record["config"].get("dataset", "unknown data")
    both = "train_size" in data and "test_size" in data
    sizes = f"{data['train_size']:,} train / {data['test_size']:,} test images, " if both else ""
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
    """Groups ordered by setup, model and series, with baselines attached (or the reason there is none)."""
    groups: dict[tuple, Group] = {}
    for record in records:
        group = Group(model=record["model"], mode=record["mode"], backend=record.get("backend"),
                      world_size=int(record["world_size"]), nodes=int(record.get("nodes") or 1),
                      device=record["device"], workload=workload_of(record), platform=platform_of(record),
                      hardware=results.of_record(record), settings=results.settings_of(record),
                      communication=communication_of(record))
        groups.setdefault((group.setup, model_order(group.model), group.series), group).runs.append(record)
    ordered = [groups[key] for key in sorted(groups)]
    singles = [group for group in ordered if group.mode == "single" and group.world_size == 1]
    for group in ordered:
        for setting in CHECKED_SETTINGS:
            values = {str(run.get(setting, run["config"].get(setting))) for run in group.runs}
            if len(values) > 1:
                warn(f"{label(group)} of {group.model} mixes runs with different {setting} "
                     f"({', '.join(sorted(values))}); its medians span them")
        group.baseline = next((other for other in singles
                               if other.model == group.model and other.setup == group.setup), None)
        if group.baseline is None:
            group.no_baseline = missing_baseline(group, [other for other in singles if other.model == group.model])
        elif group.baseline is not group:
            group.baseline.compared = True
    return ordered


def missing_baseline(group: Group, singles: list[Group]) -> str:
    """Why `group` has no single-device run to be compared with, naming the first part of its setup that no
    single-device run of its model shares: 'no 1-GPU baseline on NVIDIA A100-SXM4-40GB'."""
    one = "1-GPU" if group.device == "cuda" else "single-process"
    reasons = (("platform", f"no {one} baseline on {group.platform}"),
               ("hardware", f"no {one} baseline on {group.hardware.split(' ', 1)[-1]}"),
               ("settings", f"no {one} baseline with {group.settings}"),
               ("workload", f"no {one} baseline of {group.workload}"))
    if not singles:
        return f"no {one} run of {group.model}"
    candidates = singles
    for part, reason in reasons:
        candidates = [other for other in candidates if getattr(other, part) == getattr(group, part)]
        if not candidates:
            return reason
    return f"no {one} baseline"


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

def hardware_line(record: dict) -> str:
    """The hardware in full: 'SageMaker ml.p3.16xlarge: GPU Tesla V100-SXM2-16GB (compute capability 7.0, 8 per
    node)'."""
    env = record.get("environment") or {}
    sagemaker = record.get("sagemaker") or {}
    where = f"SageMaker {sagemaker['instance_type']}: " if sagemaker.get("instance_type") else ""
    if record["device"] == "cuda":
        details = [f"compute capability {env['gpu_capability']}"] if env.get("gpu_capability") else []
        details += [f"{env['gpu_count']} per node"] if env.get("gpu_count") else []
        return f"{where}GPU {env.get('gpu') or 'unknown'}" + (f" ({', '.join(details)})" if details else "")
    cores = env.get("cpu_count")
    return f"{where}CPU {env.get('cpu') or 'unknown'}" + (f" ({cores} cores)" if cores else "") + ", no GPU"


def setup_lines(groups: list[Group]) -> list[str]:
    """Footer lines naming every hardware, data set and software version behind a figure."""
    records = [run for group in groups for run in group.runs]
    hardware = sorted({hardware_line(run) for run in records})
    software = sorted({f"torch {run['environment']['torch']}" for run in records
                       if "torch" in (run.get("environment") or {})})
    batches = sorted({run.get("batch_size", run["config"].get("batch_size")) for run in records} - {None})
    lines = [f"Hardware: {'; '.join(hardware)}" + (f" · {', '.join(software)}" if software else "")]
    lines += [f"Speed settings: {settings}" for settings in sorted({group.settings for group in groups})]
    lines += [f"Data: {workload}" for workload in sorted({group.workload for group in groups})]
    lines += [f"Batch: {'/'.join(map(str, batches))} images per process and step"] if batches else []
    if all(run["device"] != "cuda" for run in records):
        lines.append("CPU only: a demonstration of what the suite measures, not of data-parallel speed on GPUs "
                     "(the processes of a CPU run share the host's cores and memory bandwidth)")
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
    settings = sorted({group.settings for group in groups})
    return (f"{where}{' and '.join(parts)} · {' + '.join(datasets)}"
            + (f", {'/'.join(f'{n:,}' for n in sizes)} training images" if sizes else "")
            + f" · {'/'.join(map(str, epochs))} epoch{'s' if epochs != [1] else ''}"
            + (f" · {settings[0]}" if len(settings) == 1 else ""))


def short_setup(group: Group) -> str:
    """'GPU NVIDIA H100, 50,000 images, 20 epochs,\nbf16, ...': tells the rows of different setups apart."""
    size = (group.runs[0].get("data") or {}).get("train_size")
    where = "SageMaker " if group.platform == "SageMaker" else ""
    return (f"{where}{group.hardware}, {f'{size:,} images, ' if size else ''}{group.epochs} epochs,\n"
            f"{group.settings}")


# ---- summary table -----------------------------------------------------------------------------

SUMMARY_COLUMNS = ("model", "mode", "backend", "world size", "device", "runs", "epoch time (s)", "images/s",
                   "speedup", "efficiency", "total time (s)", "speedup incl. warm-up", "final acc (%)",
                   "best acc (%)", "time to best (s)", "time to target (s)", "speedup to target",
                   "exposed comm. (scaling model)", "cost ($)")


def speedup_cell(group: Group, value: float | None) -> str:
    """'1.93×', 'baseline', or why there is no number."""
    if group.compared:
        return "baseline"
    if value is None:
        return group.no_baseline if group.mode != "single" and group.no_baseline else "—"
    return f"{value:.2f}×"


def summary_row(group: Group) -> tuple[str, ...]:
    env = group.runs[0].get("environment") or {}
    processor = env.get("gpu") if group.device == "cuda" else env.get("cpu")
    to_target, target_speedup = group.time_to_target, group.target_speedup
    target = group.runs[0].get("target_acc")
    return (group.model, group.mode, group.backend or "—", str(group.world_size),
            f"{group.device} ({processor})" if processor else group.device, str(len(group.runs)),
            group.epoch_time.text(".2f"), group.spread("median_images_per_s").text(".0f"),
            speedup_cell(group, group.speedup), "—" if group.efficiency is None else f"{group.efficiency:.0%}",
            group.spread("total_train_time_s").text(".1f"), speedup_cell(group, group.total_speedup),
            group.spread("final_test_acc").scaled(100).text(".1f"),
            group.spread("best_test_acc").scaled(100).text(".1f"), group.spread("time_to_best_s").text(".1f"),
            "—" if target is None else f"{to_target.text('.1f')} to {target:.0%}" if to_target else "not reached",
            "baseline" if group.compared and to_target else "—" if target_speedup is None else f"{target_speedup:.2f}×",
            exposed_cell(group), "—" if group.cost is None else group.cost.text(".2f"))


def exposed_cell(group: Group) -> str:
    """'12% (model 0%)': the profiled step's share spent waiting for communication, and the scaling model's."""
    exposed = group.profiled("exposed_communication_share")
    if exposed is None or group.world_size == 1:
        return "—"
    return f"{exposed.scaled(100).text('.0f')}% (model {group.predicted_exposed_share:.0%})"


def summary_markdown(groups: list[Group], results_dir: Path) -> str:
    runs = cli.count(sum(len(group.runs) for group in groups), "run")
    lines = ["# hpml results summary", "",
             f"{runs} from `{files.shown(results_dir)}`, in {cli.count(len(groups), 'group')}, one table per setup "
             "(platform, hardware, speed settings, data): runs of different setups share no median and no baseline. "
             "Numbers are medians over a group's runs (min–max in brackets when they differ).", "",
             "- **Speedup** (the headline) is steady-state: the median epoch time, over the epochs after the first, "
             "of the single-device group of the same model and setup ÷ this group's. Efficiency = speedup ÷ world "
             "size. Where there is no such single-device group the cell says why.",
             "- **Total time** is the whole training time, the first epoch's warm-up (kernel selection, CUDA graph "
             "capture, compile) included, and **speedup incl. warm-up** is the ratio of those totals. Training "
             "time excludes evaluation; images/s is the median over the epochs after the first.",
             "- **Time to target** (--target-acc): training time until the test accuracy first reached the target, "
             "and the speedup in it, the fair measure when a larger global batch learns more slowly.",
             "- **Exposed comm.** (runs with --profile): the share of a profiled step that waited for gradient "
             "communication not hidden behind computation, from the runs' traces; in brackets the scaling model's "
             "share (hpml/study/scaling.py: the measured communication less the backward pass, two thirds of the "
             "rest of the step, that hides it). Where the measured share is higher, communication is not hidden as the "
             "model assumes; where both are near zero, efficiency falls for other reasons (shared CPU cores, memory "
             "bandwidth).",
             "- **Cost**: each run's share of its SageMaker job's bill (a job's runs add up to its bill)."]
    for panel in by_setup(groups):
        lines += ["", f"## {title_tag(panel)}", "", *(f"- {line}" for line in setup_lines(panel)), "",
                  "| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
        lines += ["| " + " | ".join(summary_row(group)) + " |" for group in panel]
    return "\n".join(lines) + "\n"
