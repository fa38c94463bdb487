"""The results schema (one JSON file per run), written atomically, read back by plots and collect; and what a run
was measured on: two runs are one experiment only when their processor and speed settings match (besides model,
data and length), so a speedup never divides an A100's time by a V100's, nor a bf16 run's by an fp32 run's.

Imports no torch: the laptop client reads and writes records too; environment() asks torch when a run records it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from hpml import files
from hpml.config import MAX_EPOCHS

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1
REQUIRED_FIELDS = ("schema_version", "run_id", "model", "mode", "world_size", "device", "config", "epochs",
                   "total_train_time_s", "median_images_per_s", "final_test_acc", "best_test_acc", "time_to_best_s")
EPOCH_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s", "data_time_s",
                "images_per_s")
RUN_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,199}", re.ASCII)  # <run_id>.json and <run_id>.utilization.csv are files
TRACE_SUFFIX = ".trace.json"  # --profile's traces beside the records (hpml.training.profiling): JSON, but no record
UNSHOWABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # control characters, and what UTF-8 cannot write
LIMIT = 10**15  # above any real count, size, time or price; far below where arithmetic on it overflows


def _is_number(value: object) -> bool:
    """An int or float, not a bool: NaN and infinities fail every range check below."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Check:
    """What a record field may hold: `allowed` says it in words, `test` decides; `nullable` lets null through too."""

    allowed: str
    test: Callable[[object], bool]
    nullable: bool = False

    def accepts(self, value: object) -> bool:
        return (self.nullable and value is None) or self.test(value)

    def or_null(self) -> Check:
        return dataclasses.replace(self, nullable=True)

    def __str__(self) -> str:
        return f"{self.allowed} or null" if self.nullable else self.allowed


SCHEMA = Check(str(SCHEMA_VERSION), lambda v: _is_integer(v) and v == SCHEMA_VERSION)
NAME = Check("a file name: up to 200 letters, digits, '_', '.' or '-', starting with a letter or digit",
             lambda v: isinstance(v, str) and RUN_ID.fullmatch(v) is not None)
TEXT = Check("a non-empty line of text", lambda v: isinstance(v, str) and v != "" and not UNSHOWABLE.search(v))
STRING = Check("a string", lambda v: isinstance(v, str))
COUNT = Check("a whole number from 1 to 10^15", lambda v: _is_integer(v) and 1 <= v <= LIMIT)
SIZE = Check("a whole number from 0 to 10^15", lambda v: _is_integer(v) and 0 <= v <= LIMIT)
AMOUNT = Check("a number from 0 to 10^15", lambda v: _is_number(v) and 0 <= v <= LIMIT)
POSITIVE = Check("a number above 0, at most 10^15", lambda v: _is_number(v) and 0 < v <= LIMIT)
SECONDS = Check("a number of seconds from 1e-6 to 10^15", lambda v: _is_number(v) and 1e-6 <= v <= LIMIT)
FRACTION = Check("a number from 0 to 1", lambda v: _is_number(v) and 0 <= v <= 1)
TARGET = Check("a number above 0, at most 1", lambda v: _is_number(v) and 0 < v <= 1)
SWITCH = Check("true or false", lambda v: isinstance(v, bool))
OBJECT = Check("a JSON object", lambda v: isinstance(v, dict))
EPOCH_LIST = Check(f"a list of 1 to {MAX_EPOCHS} JSON objects",  # as many epochs as --epochs allows
                   lambda v: isinstance(v, list) and 1 <= len(v) <= MAX_EPOCHS and all(isinstance(e, dict) for e in v))

# Every field a reader uses (summary, plots, study, sagemaker_plan, hardware, jobs), checked in this order: a part
# ("config") before its fields ("config.lr"); "epochs[].lr" is the field of every epoch. REQUIRED_FIELDS and
# EPOCH_FIELDS must be there; any other may be absent, and a part's fields are not looked at when it is null.
RECORD_FIELDS: dict[str, Check] = {
    "schema_version": SCHEMA, "run_id": NAME, "model": TEXT, "mode": TEXT, "backend": TEXT.or_null(),
    "world_size": COUNT, "nodes": COUNT.or_null(), "device": TEXT, "batch_size": COUNT, "lr": POSITIVE,
    "optimizer": TEXT, "schedule": TEXT, "started_at": TEXT.or_null(),
    "total_train_time_s": SECONDS, "median_epoch_time_s": SECONDS, "median_images_per_s": AMOUNT,
    "final_test_acc": FRACTION, "best_test_acc": FRACTION, "time_to_best_s": SECONDS, "target_acc": TARGET.or_null(),
    "time_to_target_s": SECONDS.or_null(), "total_wall_time_s": AMOUNT,
    "epochs": EPOCH_LIST, "epochs[].epoch": COUNT, "epochs[].train_loss": AMOUNT, "epochs[].train_acc": FRACTION,
    "epochs[].test_loss": AMOUNT, "epochs[].test_acc": FRACTION, "epochs[].epoch_time_s": SECONDS,
    "epochs[].data_time_s": AMOUNT, "epochs[].images_per_s": AMOUNT,
    "config": OBJECT, "config.dataset": TEXT.or_null(), "config.data_dir": STRING.or_null(), "config.batch_size": COUNT,
    "config.lr": POSITIVE, "config.optimizer": TEXT, "config.schedule": TEXT, "config.precision": TEXT.or_null(),
    "config.loader": TEXT.or_null(), "config.drop_last": SWITCH, "config.grad_compression": TEXT,
    "config.bucket_cap_mb": POSITIVE, "config.static_graph": SWITCH,
    "speed": OBJECT.or_null(), "speed.precision": TEXT.or_null(), "speed.loader": TEXT.or_null(),
    "speed.channels_last": SWITCH.or_null(), "speed.cuda_graphs": SWITCH.or_null(), "speed.compile": SWITCH.or_null(),
    "data": OBJECT.or_null(), "data.description": TEXT.or_null(), "data.train_size": SIZE, "data.test_size": SIZE,
    "environment": OBJECT.or_null(), "environment.gpu": TEXT.or_null(), "environment.cpu": TEXT.or_null(),
    "environment.torch": TEXT.or_null(), "environment.gpu_capability": TEXT.or_null(),
    "environment.gpu_count": SIZE.or_null(), "environment.cpu_count": SIZE.or_null(),
    "sagemaker": OBJECT.or_null(), "sagemaker.job_name": TEXT.or_null(), "sagemaker.instance_type": TEXT.or_null(),
    "sagemaker.cost_usd": AMOUNT.or_null(), "sagemaker.status": TEXT.or_null(),
    "sagemaker.billable_time_share_s": AMOUNT.or_null(),
    "utilization": OBJECT.or_null(), "utilization.samples_csv": STRING.or_null(),
    "profile": OBJECT.or_null(), "profile.step_ms": POSITIVE, "profile.compute_ms": AMOUNT,
    "profile.optimizer_ms": AMOUNT, "profile.data_ms": AMOUNT, "profile.communication_ms": AMOUNT,
    "profile.exposed_communication_ms": AMOUNT, "profile.exposed_communication_share": FRACTION,
    "profile.synced_step_ms": POSITIVE.or_null(), "profile.no_sync_step_ms": POSITIVE.or_null(),
    "profile.communication_cost_share": FRACTION.or_null(),
}
REQUIRED = frozenset({*REQUIRED_FIELDS, *(f"epochs[].{name}" for name in EPOCH_FIELDS)})


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_id(model: str, mode: str, world_size: int) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{model}_{mode}_w{world_size}_{stamp}_{uuid.uuid4().hex[:6]}"


def environment(device: torch.device) -> dict:
    """What the numbers were measured on: software versions and hardware."""
    import torch

    cuda = device.type == "cuda"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": importlib.metadata.version("torchvision"),  # without importing it
        "cuda": torch.version.cuda if cuda else None,
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        **source_version(),
    }


def source_version() -> dict:
    """The commit the code came from, whether the work tree differed from it (changed or untracked files), and a
    hash of that difference, so that a figure names the code that made it; Nones outside a git work tree."""
    folder = Path(__file__).resolve().parent
    commit = _git(folder, "rev-parse", "HEAD")
    status = _git(folder, "status", "--porcelain") if commit else None
    if not commit or status is None:
        return {"git_commit": commit or None, "git_dirty": None, "git_diff_sha256": None}
    difference = (_git(folder, "diff", "HEAD", "--binary") or "") + status
    return {"git_commit": commit, "git_dirty": bool(status),
            "git_diff_sha256": hashlib.sha256(difference.encode()).hexdigest() if status else None}


def _git(folder: Path, *arguments: str) -> str | None:
    try:
        out = subprocess.run(["git", *arguments], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def steady_epochs(epochs: list[dict]) -> list[dict]:
    """The epochs after the first, whose times exclude warm-up (kernel selection, graph capture, compile); the
    one epoch of a one-epoch run."""
    return epochs[1:] or epochs


def summarize_epochs(epochs: list[dict], target_acc: float | None = None) -> dict:
    """Run totals from per-epoch metrics. Throughput is the median over epochs after the first (warm-up).
    Time to target: training time up to the end of the first epoch whose test accuracy reaches `target_acc`
    (None when there is no target or no epoch reached it)."""
    steady = steady_epochs(epochs)
    best = max(epochs, key=lambda e: e["test_acc"])
    return {
        "total_train_time_s": sum(e["epoch_time_s"] for e in epochs),
        "median_epoch_time_s": statistics.median(e["epoch_time_s"] for e in steady),
        "median_images_per_s": statistics.median(e["images_per_s"] for e in steady),
        "final_test_acc": epochs[-1]["test_acc"],
        "best_test_acc": best["test_acc"],
        "best_epoch": best["epoch"],
        "time_to_best_s": sum(e["epoch_time_s"] for e in epochs[: best["epoch"] - epochs[0]["epoch"] + 1]),
        "target_acc": target_acc,
        "time_to_target_s": None if target_acc is None else time_to_target(epochs, target_acc),
    }


def time_to_target(epochs: list[dict], target_acc: float) -> float | None:
    """Training time summed up to the first epoch whose test accuracy is at least `target_acc`; None if none is."""
    elapsed = 0.0
    for epoch in epochs:
        elapsed += epoch["epoch_time_s"]
        if epoch["test_acc"] >= target_acc:
            return elapsed
    return None


def build_record(model: str, run_log: dict, config: dict, world: dict, trainer: dict, data: dict,
                 environment: dict, total_wall_time_s: float, checkpoint: str) -> dict:
    """One run's record, from the training loop's `run_log` (id, epochs, times, resumes), the flags as `config`,
    what the world, the trainer (lr, speed, params) and the data say of themselves, and the environment."""
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_log["run_id"],
        "model": model,
        **world,
        "batch_size": config["batch_size"],
        "global_batch_size": config["batch_size"] * world["world_size"],
        **trainer,
        "started_at": run_log["started_at"],
        "finished_at": utc_now(),
        "resumes": run_log["resumes"],
        "config": config,
        "data": data,
        "environment": environment,
        "epochs": run_log["epochs"],
        **summarize_epochs(run_log["epochs"], config.get("target_acc")),
        "total_wall_time_s": total_wall_time_s,
        "setup_time_s": run_log["setup_time_s"],
        "checkpoint_time_s": run_log["checkpoint_time_s"],
        "checkpoint": checkpoint,
    }


def check_output_folder(folder: str | Path) -> Path:
    """Create the output folder if needed and prove a file can be written there; UsageError otherwise."""
    return files.check_writable(folder, "output folder")


def write_json_atomic(path: Path, data: dict, *, overwrite: bool = True) -> Path:
    """Write JSON through a temp file and a rename: never half a file; NaN is refused, not written."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    return files.write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite)


def write_results(record: dict, output_dir: str | Path) -> Path:
    """Write one run's record as <output_dir>/<run_id>.json, never replacing an existing file."""
    return write_json_atomic(Path(output_dir) / f"{record['run_id']}.json", record, overwrite=False)


def validate_record(record: object) -> dict:
    """The record if it is a results record of this schema; ValueError naming the first field that is missing or
    holds what RECORD_FIELDS does not allow otherwise."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise ValueError(f"missing fields: {', '.join(missing)}")
    for path, check in RECORD_FIELDS.items():
        key = path.rpartition(".")[2]
        for name, holder in _holders(record, path):
            if key not in holder:
                if path in REQUIRED:
                    raise ValueError(f"{name} is missing; it must be {check}")
            elif not check.accepts(holder[key]):
                raise ValueError(f"{name} must be {check}, found {_found(holder[key])}")
    return record


def _holders(record: dict, path: str) -> Iterator[tuple[str, dict]]:
    """(the field's name, the object that holds it) for each place `path` names: the record for "lr", its config
    for "config.lr" (none when config is null), each epoch for "epochs[].lr"."""
    part, _, key = path.rpartition(".")
    if not part:
        yield path, record
    elif part.endswith("[]"):
        for index, item in enumerate(record[part[:-2]]):
            yield f"{part[:-2]}[{index}].{key}", item
    elif record.get(part) is not None:
        yield path, record[part]


def _found(value: object) -> str:
    """A value as JSON writes it, on one line and cut short: "two", NaN, null, [1]."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= 60 else f"{text[:57]}..."


def trace_name(run_id: str, rank: int) -> str:
    """The name of rank `rank`'s --profile trace, beside the run's record."""
    return f"{run_id}.rank{rank}{TRACE_SUFFIX}"


def is_record_file(path: str | Path) -> bool:
    """Whether a file's name is that of a results record: <run_id>.json, not a trace."""
    name = Path(path).name
    return name.endswith(".json") and not name.endswith(TRACE_SUFFIX)


def load_results(path: str | Path) -> dict:
    """One results file; ValueError naming the file when it is not valid JSON or not of this schema."""
    try:
        with files.open_regular(path) as file:
            return validate_record(json.loads(file.read().decode("utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as error:
        raise ValueError(f"{files.shown(path)}: {error}") from None


def load_all(folder: str | Path) -> tuple[list[dict], list[str]]:
    """Every valid record under `folder` (sorted by start time) and a message per file skipped."""
    records, skipped, seen = [], [], {}
    for path in sorted(filter(is_record_file, Path(folder).glob("*.json"))):
        try:
            record = load_results(path)
        except ValueError as error:
            skipped.append(str(error))
            continue
        if record["run_id"] in seen:  # a copy of a run (say, collected twice) counts once
            skipped.append(f"{files.shown(path)}: a copy of run {record['run_id']} already read from "
                           f"{files.shown(seen[record['run_id']])}")
            continue
        seen[record["run_id"]] = path
        records.append(record)
    records.sort(key=lambda r: (r.get("started_at") or "", r["run_id"]))
    return records, skipped


# What a run was measured on and with.
def cpu_name() -> str:
    """The CPU model, as /proc/cpuinfo names it (else what Python's platform module knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def of_record(record: dict) -> str:
    """The processor a run trained on: 'GPU NVIDIA A100-SXM4-40GB' or 'CPU AMD EPYC 7B13'."""
    env = record.get("environment") or {}
    if record["device"] == "cuda":
        return f"GPU {env.get('gpu') or 'unknown'}"
    return f"CPU {env.get('cpu') or 'unknown'}"


def local(device: str) -> str:
    """The processor a run started here with --device `device` trains on, in of_record's words: the GPU CUDA
    numbers 0 (as NVML names it), or the CPU for --device cpu and where NVML finds no GPU."""
    from hpml import monitor  # here: a training run, which reads and writes records, needs no NVML

    gpu = monitor.first_cuda_gpu_name() if device != "cpu" else None
    return f"GPU {gpu}" if gpu else f"CPU {cpu_name()}"


def settings_of(record: dict) -> str:
    """The speed settings a run resolved to, in words: 'bf16, device loader, channels-last, drop last'.
    A field a record predates counts as what runs did before it existed (no CUDA graphs, a partial last batch)."""
    speed, config = record.get("speed") or {}, record.get("config") or {}
    parts = [speed.get("precision") or config.get("precision") or "fp32",
             f"{speed.get('loader') or config.get('loader') or 'torch'} loader",
             "channels-last" if speed.get("channels_last") else "NCHW"]
    if speed.get("cuda_graphs"):
        parts.append("CUDA graphs")
    if speed.get("compile"):
        parts.append("compiled")
    parts.append("drop last" if config.get("drop_last") else "partial last batch")
    return ", ".join(parts)
