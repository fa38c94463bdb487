"""The study: a matrix of runs (models x world sizes x repeats), which of them are done, and running the rest.

Client layer: imports no torch (the training runs are separate processes). run_study.py is the script over it.
A cell is done when --output-dir holds a results JSON of the same model, world size and defining settings (and, for a
study on this machine, trained on the same GPU or CPU model); with several repeats, the first n cells of a model and
world size are done when n such files are there.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import cli, hardware
from .config import TrainConfig
from .errors import UsageError

# The settings that make two runs the same experiment (besides model, world size and hardware): what is trained and
# how fast; others (loader workers, quiet, monitoring) change how a run is watched, not what it measures.
DEFINING_FIELDS = ("epochs", "batch_size", "lr", "optimizer", "schedule", "dataset", "subset", "seed", "target_acc",
                   "drop_last", "precision", "loader", "channels_last", "cuda_graphs", "compile")
# What a run made before a defining setting existed trained with, where that differs from today's default.
PREDATED = {"drop_last": False}
# Settings of data-parallel runs only: one process ignores them, so a baseline matches whatever they are.
DATA_PARALLEL_FIELDS = ("scale_lr", "grad_compression", "bucket_cap_mb", "static_graph")
REPO = Path(__file__).resolve().parent.parent
SINGLE_DEVICE_SCRIPT, DATA_PARALLEL_SCRIPT = REPO / "run_hpc.py", REPO / "run_distributed.py"
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone")


@dataclass(frozen=True)
class Cell:
    """One run of the study: a model at a world size (1: the single-device baseline), one of its repeats."""

    model: str
    world_size: int
    repeat: int  # from 0

    @property
    def mode(self) -> str:
        return "single" if self.world_size == 1 else "distributed"

    def __str__(self) -> str:
        return f"{self.model} x{self.world_size} ({self.mode}) #{self.repeat + 1}"


def parse_world_sizes(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; UsageError naming a size that is not a positive integer."""
    sizes: list[int] = []
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        if not part.isdigit() or int(part) < 1:
            raise UsageError(f"--world-sizes takes positive integers separated by commas (e.g. 1,2,4), got {part!r}")
        if int(part) not in sizes:
            sizes.append(int(part))
    if not sizes:
        raise UsageError(f"--world-sizes needs at least one size, got {text!r}")
    return sizes


def plan(models: Sequence[str], world_sizes: Sequence[int], repeats: int) -> list[Cell]:
    """Every cell, model by model, the baseline first."""
    return [Cell(model, size, repeat) for model in models for size in sorted(world_sizes) for repeat in range(repeats)]


def defining_settings(config: dict, world_size: int) -> dict:
    """What makes a run of this world size the same experiment (besides the hardware and the data folder)."""
    names = DEFINING_FIELDS + (DATA_PARALLEL_FIELDS if world_size > 1 else ())
    return {name: config.get(name, PREDATED.get(name, getattr(cli.DEFAULTS, name))) for name in names}


def common_speed_settings(cfg: TrainConfig, world_sizes: Sequence[int]) -> TrainConfig:
    """The study's config with CUDA graphs decided for every cell alike: a speed setting left to each script's
    per-world default (on for one CUDA process, off under DDP) would make the baseline a different experiment."""
    if cfg.cuda_graphs is None and max(world_sizes) > 1:
        cfg.cuda_graphs = False
    return cfg


def settings_id(cfg: TrainConfig, cell: Cell, *more: str) -> str:
    """8 hex digits that differ when the cell's defining settings (or `more`, e.g. an instance type) differ: part of
    the names of the cell's batch and SageMaker jobs, so that a re-run finds them and another study does not."""
    text = json.dumps([defining_settings(cfg.as_dict(), cell.world_size), *more], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def is_run_of(record: dict, cell: Cell, cfg: TrainConfig, trained_on: str | None = None) -> bool:
    """Whether a results record is a local run of this cell's model, world size and settings, of the same CIFAR-10
    folder (and, when given, on this GPU or CPU model, in hardware.of_record's words). A job's name (settings_id)
    leaves the folder out: a SageMaker job reads its data from S3, and a re-run from another folder must find it."""
    return (record["model"] == cell.model and int(record["world_size"]) == cell.world_size
            and record["mode"] == cell.mode and not record.get("sagemaker")
            and (trained_on is None or hardware.of_record(record) == trained_on)
            and defining_settings(record["config"], cell.world_size) == defining_settings(cfg.as_dict(),
                                                                                           cell.world_size)
            and (cfg.dataset != "cifar10" or record["config"].get("data_dir") == cfg.data_dir))


def cells_to_run(cells: list[Cell], records: list[dict], cfg: TrainConfig, force: bool = False,
                 trained_on: str | None = None) -> list[Cell]:
    """The cells without a matching results record (all of them with `force`)."""
    if force:
        return list(cells)
    return [cell for cell in cells
            if sum(is_run_of(record, cell, cfg, trained_on) for record in records) <= cell.repeat]


def local_command(cell: Cell, cfg: TrainConfig) -> list[str]:
    """World size 1: run_hpc.py, the single-device path. Larger: torchrun with that many processes of
    run_distributed.py (one per GPU when there are GPUs, else gloo processes on the CPU: --backend auto chooses)."""
    distributed = cell.world_size > 1
    values = {**cli.flag_values(cfg, distributed), "model": cell.model}
    flags = [text for name, value in values.items() for text in (f"--{name}", value)]
    if not distributed:
        return [sys.executable, str(SINGLE_DEVICE_SCRIPT), *flags]
    return [*TORCHRUN, "--nproc_per_node", str(cell.world_size), str(DATA_PARALLEL_SCRIPT), *flags]


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '1 h 02 min'."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_line(cell: Cell, ok: bool, done: int, total: int, elapsed: float) -> str:
    """After a cell: how it went, cells done / to do, time so far and an estimate of what is left (the mean
    time of the cells run so far, times the cells still to run)."""
    left = total - done
    estimate = f"~{duration(elapsed / done * left)} remaining" if left else "finished"
    return (f"[{done}/{total}] {cell}: {'done' if ok else 'FAILED'} · {left} to do · {duration(elapsed)} elapsed "
            f"· {estimate}")


def run_command(command: list[str]) -> int:
    """Run one cell's training in the foreground, its output on this console; its exit code.

    Every training process gets one CPU thread unless OMP_NUM_THREADS says otherwise, as torchrun gives each of
    its processes: on a CPU, world size N then uses N cores against the baseline's one, and a baseline's threads
    do not thrash on a machine that others share (measured: 26x "speedups" of 2 processes over 1)."""
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    return subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": threads}).returncode


def run_cells(cells: list[Cell], command_of: Callable[[Cell], list[str]],
              log: Callable[[str], None] = print) -> list[Cell]:
    """Run each cell in turn; a failed cell is reported and the rest still run. Returns the failed cells."""
    failed: list[Cell] = []
    start = time.monotonic()
    for done, cell in enumerate(cells, start=1):
        log(f"--- {cell}: {' '.join(command_of(cell))}")
        ok = run_command(command_of(cell)) == 0
        if not ok:
            failed.append(cell)
        log(progress_line(cell, ok, done, len(cells), time.monotonic() - start))
    return failed
