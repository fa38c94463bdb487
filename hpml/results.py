"""The results schema (one JSON file per run), written atomically, read back by plots and collect.

Imports no torch: the laptop client reads and writes records too; environment() asks torch when a run records it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import statistics
import subprocess
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from . import files, hardware

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1
REQUIRED_FIELDS = ("schema_version", "run_id", "model", "mode", "world_size", "device", "config", "epochs",
                   "total_train_time_s", "final_test_acc", "best_test_acc")
EPOCH_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s", "data_time_s",
                "images_per_s")


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
        "cpu": hardware.cpu_name(),
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


def build_record(model: str, progress: dict, config: dict, world: dict, trainer: dict, data: dict,
                 environment: dict, total_wall_time_s: float, checkpoint: str) -> dict:
    """One run's record, from the checkpoint's `progress` (epochs, times, resumes), the flags as `config`, what
    the world, the trainer (lr, speed, params) and the data say of themselves, and the environment."""
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": progress["run_id"],
        "model": model,
        **world,
        "batch_size": config["batch_size"],
        "global_batch_size": config["batch_size"] * world["world_size"],
        **trainer,
        "started_at": progress["started_at"],
        "finished_at": utc_now(),
        "resumes": progress["resumes"],
        "config": config,
        "data": data,
        "environment": environment,
        "epochs": progress["epochs"],
        **summarize_epochs(progress["epochs"], config.get("target_acc")),
        "total_wall_time_s": total_wall_time_s,
        "setup_time_s": progress["setup_time_s"],
        "checkpoint_time_s": progress["checkpoint_time_s"],
        "checkpoint": checkpoint,
    }


def check_writable(folder: str | Path) -> Path:
    """Create the output folder if needed and prove a file can be written there; UsageError otherwise."""
    return files.check_writable(folder, "output folder")


def write_json_atomic(path: Path, data: dict, *, overwrite: bool = True) -> Path:
    """Write JSON through a temp file and a rename: never half a file; NaN is refused, not written."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    return files.write_atomic(path, lambda tmp: tmp.write_text(text), overwrite=overwrite)


def write_results(record: dict, output_dir: str | Path) -> Path:
    """Write one run's record as <output_dir>/<run_id>.json, never replacing an existing file."""
    return write_json_atomic(Path(output_dir) / f"{record['run_id']}.json", record, overwrite=False)


def validate_record(record: object) -> dict:
    """The record if it is a results record of this schema; ValueError saying what is wrong otherwise."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise ValueError(f"missing fields: {', '.join(missing)}")
    if record["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"schema_version {record['schema_version']!r}, expected {SCHEMA_VERSION}")
    if not record["epochs"] or any(not all(f in e for f in EPOCH_FIELDS) for e in record["epochs"]):
        raise ValueError("epochs must be a non-empty list of per-epoch metrics")
    return record


def load_results(path: str | Path) -> dict:
    """One results file; ValueError naming the file when it is not valid JSON or not of this schema."""
    try:
        return validate_record(json.loads(Path(path).read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


def load_all(folder: str | Path) -> tuple[list[dict], list[str]]:
    """Every valid record under `folder` (sorted by start time) and a message per file skipped."""
    records, skipped, seen = [], [], {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            record = load_results(path)
        except ValueError as error:
            skipped.append(str(error))
            continue
        if record["run_id"] in seen:  # a copy of a run (say, collected twice) counts once
            skipped.append(f"{path}: a copy of run {record['run_id']} already read from {seen[record['run_id']]}")
            continue
        seen[record["run_id"]] = path
        records.append(record)
    records.sort(key=lambda r: (r.get("started_at") or "", r["run_id"]))
    return records, skipped
