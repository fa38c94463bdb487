"""The study: a matrix of runs (models x world sizes x repeats), which of them are done, and running the rest.

Client layer: imports no torch (the training runs are separate processes). run_study.py is the script over it.
A cell is done when --output-dir holds a results JSON of the same model, world size and defining settings (and, for a
study on this machine, trained on the same GPU or CPU model); with several repeats, the first n cells of a model and
world size are done when n such files are there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType

import psutil

from hpml import cli, results, scripts
from hpml.config import MAX_THREADS, MAX_WORLD_SIZE, TrainConfig, comma_list
from hpml.errors import RunStopped, UsageError

# The settings that make two runs the same experiment (besides model, world size and hardware): what is trained and
# how fast; others (loader workers, quiet, monitoring) change how a run is watched, not what it measures.
DEFINING_FIELDS = ("epochs", "batch_size", "lr", "optimizer", "schedule", "dataset", "subset", "seed", "target_acc",
                   "drop_last", "precision", "loader", "channels_last", "cuda_graphs", "compile")
# What a run made before a defining setting existed trained with, where that differs from today's default.
PREDATED = {"drop_last": False}
# Settings of data-parallel runs only: one process ignores them, so a baseline matches whatever they are.
DATA_PARALLEL_FIELDS = ("scale_lr", "grad_compression", "bucket_cap_mb", "static_graph")
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
    """'1,2,4' -> [1, 2, 4]; UsageError naming a size that is not a positive integer up to MAX_WORLD_SIZE."""
    sizes: list[int] = []
    for part in comma_list(text, "--world-sizes"):
        if not (part.isascii() and part.isdigit() and 1 <= int(part) <= MAX_WORLD_SIZE):
            raise UsageError(f"--world-sizes takes positive integers up to {MAX_WORLD_SIZE} separated by commas "
                             f"(e.g. 1,2,4), got {part!r}")
        if int(part) not in sizes:
            sizes.append(int(part))
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
    folder (and, when given, on this GPU or CPU model, in results.of_record's words), with a --profile breakdown
    when the study profiles. A job's name (settings_id) leaves the folder out: a SageMaker job reads its data from
    S3, and a re-run from another folder must find it."""
    return (record["model"] == cell.model and int(record["world_size"]) == cell.world_size
            and record["mode"] == cell.mode and not record.get("sagemaker")
            and (trained_on is None or results.of_record(record) == trained_on)
            and defining_settings(record["config"], cell.world_size) == defining_settings(cfg.as_dict(),
                                                                                           cell.world_size)
            and (cfg.dataset != "cifar10" or record["config"].get("data_dir") == cfg.data_dir)
            and (not cfg.profile or "profile" in record))


def cells_to_run(cells: list[Cell], records: list[dict], cfg: TrainConfig, force: bool = False,
                 trained_on: str | None = None) -> list[Cell]:
    """The cells without a matching results record (all of them with `force`)."""
    if force:
        return list(cells)
    return [cell for cell in cells
            if sum(is_run_of(record, cell, cfg, trained_on) for record in records) <= cell.repeat]


def local_command(cell: Cell, cfg: TrainConfig) -> list[str]:
    """World size 1: run_hpc.py's module, the single-device path. Larger: torchrun with that many processes of
    run_distributed.py's (one per GPU when there are GPUs, else gloo processes on the CPU: --backend auto chooses).
    run_command's PYTHONPATH has them import this hpml package."""
    distributed = cell.world_size > 1
    values = {**cli.flag_values(cfg, distributed), "model": cell.model}
    flags = [text for name, value in values.items() for text in (f"--{name}", value)]
    if not distributed:
        return [sys.executable, "-m", scripts.SINGLE_DEVICE, *flags]
    return [*TORCHRUN, "--nproc_per_node", str(cell.world_size), "-m", scripts.DATA_PARALLEL, *flags]


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


def check_environment() -> None:
    """UsageError naming an OMP_NUM_THREADS the cells would get that is not a positive integer up to MAX_THREADS:
    libgomp ignores an empty or 0 value and the training then uses every core."""
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads is not None and not (threads.isascii() and threads.isdigit() and 0 < int(threads) <= MAX_THREADS):
        raise UsageError(f"OMP_NUM_THREADS must be a positive integer (CPU threads per training process) or unset, "
                         f"got {threads!r}; at most {MAX_THREADS}")


def local_processor(device: str) -> str:
    """What the cells of a study on this machine train on (results.local); UsageError for --device cuda where NVML
    finds no GPU, before any cell starts."""
    trained_on = results.local(device)
    if device == "cuda" and not trained_on.startswith("GPU "):
        raise UsageError(f"--device cuda: no GPU here (NVML finds none; this machine has a {trained_on}); use "
                         "--device auto or cpu, or --where slurm to train on a cluster's GPUs")
    return trained_on


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
KILL_AFTER_S = 60.0  # how long a cell stopped by a signal has to save its checkpoint and end before it is killed
POLL_S = 0.2


class CellSignals:
    """While the cells run, SIGINT, SIGTERM and SIGHUP stop the study at a checkpoint.

    The first one goes on to the running cell's process group (SIGHUP as SIGTERM, which the training scripts
    handle): run_hpc.py, or torchrun, which hands it to its ranks (each in a session of its own); they save a
    checkpoint and end, and no further cell starts. A second Ctrl-C, or a cell still running KILL_AFTER_S after
    the signal, is killed with every process it started. Use it as a context manager around the cells."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.kill_at = float("inf")
        self.kill_reason = ""
        self.forwarded = self.killed = False

    def __enter__(self) -> CellSignals:
        self.previous = {sig: signal.signal(sig, self.handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum, self.kill_at, self.kill_reason = signum, time.monotonic() + KILL_AFTER_S, f"{KILL_AFTER_S:g} s"
        elif signum == signal.SIGINT:
            self.kill_at, self.kill_reason = time.monotonic(), "a second Ctrl-C"

    def wait(self, process: subprocess.Popen) -> int:
        """The exit code of a cell's process (started in a session of its own), once it and what it started ended."""
        tree: set[psutil.Process] = set()
        while True:
            try:
                code = process.wait(POLL_S)
                break
            except subprocess.TimeoutExpired:
                if self.signum is not None:
                    tree |= self.stop(process.pid)
        kill_all(tree)
        return code

    def stop(self, group: int) -> set[psutil.Process]:
        """Forward the signal to the cell's process group once, kill the group when its time is up; the processes the
        cell has started (torchrun's ranks are in sessions of their own), to kill whatever outlives it."""
        tree = descendants(group)
        if not self.forwarded:
            send(group, signal.SIGTERM if self.signum == signal.SIGHUP else self.signum)
            self.forwarded = True
        if time.monotonic() >= self.kill_at and not self.killed:
            send(group, signal.SIGKILL)
            self.killed = True
        return tree

    def stopped(self, cell: Cell, code: int | None, cfg: TrainConfig) -> RunStopped:
        """The one line the study ends with after a stop signal: where `cell` stands (`code` None: not started)."""
        name = signal.Signals(self.signum).name
        if code is None or code == 0:
            where = f"before {cell}" if code is None else f"after {cell} finished"
            return RunStopped(f"stopped by {name} {where}; rerun the same command to continue", 128 + self.signum)
        checkpoint = cfg.checkpoint_path(cell.model, cell.mode, cell.world_size)
        killed = f", killed after {self.kill_reason}" if self.killed else ""
        saved = f"its checkpoint: {checkpoint}" if checkpoint.exists() else "it had saved no checkpoint yet"
        again = "rerun the same command" + ("" if cfg.resume else " with --resume")
        return RunStopped(f"stopped by {name} during {cell}{killed}; {saved}; {again} to continue", 128 + self.signum)


def descendants(pid: int) -> set[psutil.Process]:
    try:
        return set(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return set()


def kill_all(processes: set[psutil.Process]) -> None:
    """SIGKILL every one of these processes still running, and wait (a few seconds at most) until they have ended."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()
    deadline = time.monotonic() + 5
    while not all(map(ended, processes)) and time.monotonic() < deadline:
        time.sleep(0.05)


def ended(process: psutil.Process) -> bool:
    """Whether a process has ended: gone, or a zombie (an orphan's, where PID 1 reaps none)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def send(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signum)


def run_command(command: list[str], signals: CellSignals) -> int:
    """Run one cell's training in a process group of its own, its output on this console; its exit code.

    Every training process gets one CPU thread unless OMP_NUM_THREADS says otherwise, as torchrun gives each of
    its processes: on a CPU, world size N then uses N cores against the baseline's one, and a baseline's threads
    do not thrash on a machine that others share (measured: 26x "speedups" of 2 processes over 1). PYTHONPATH
    leads to this hpml package, a checkout's or an installed one, whatever the folder the study runs in."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": scripts.pythonpath(os.environ.get("PYTHONPATH"))}
    process = subprocess.Popen(command, env=env, start_new_session=True)
    return signals.wait(process)


def run_cells(cells: list[Cell], cfg: TrainConfig, log: Callable[[str], None] = print) -> list[Cell]:
    """Run each cell in turn; a failed cell is reported and the rest still run. Returns the failed cells; raises
    RunStopped when a stop signal came (CellSignals)."""
    failed: list[Cell] = []
    start = time.monotonic()
    with CellSignals() as signals:
        for done, cell in enumerate(cells, start=1):
            if signals.signum is not None:
                raise signals.stopped(cell, None, cfg)
            command = local_command(cell, cfg)
            log(f"--- {cell}: {shlex.join(command)}")
            code = run_command(command, signals)
            if signals.signum is not None:
                raise signals.stopped(cell, code, cfg)
            if code != 0:
                failed.append(cell)
            log(progress_line(cell, code == 0, done, len(cells), time.monotonic() - start))
    return failed
