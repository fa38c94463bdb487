"""Helpers the test modules share: run a script as a user would or in this process, read its results, make data.

Fixtures live in conftest.py; plain functions and constants live here, so no test module imports another.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from hpml import cli, results

REPO = Path(__file__).resolve().parent.parent
FAKE_PYNVML = Path(__file__).with_name("fake_pynvml.py")  # a two-GPU stand-in for pynvml


def run_script(script: str, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts in a subprocess, as a user would from a shell."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def exit_code_of(main: Callable, argv: Sequence[str]) -> int:
    """Run a script's main(argv) in this process through cli.run_script, as its __main__ does; the exit code."""
    with pytest.raises(SystemExit) as stop:
        cli.run_script(main, list(argv))
    return stop.value.code


def script_main(script: str) -> Callable:
    """The main() of a script given by its path in the repository (bench/ scripts are not importable by name)."""
    name = "hpml_script_" + script.removesuffix(".py").replace("/", "_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / script)
        module: ModuleType = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].main


def results_in(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def fake_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10


def write_npz(folder: Path, train: int, test: int) -> Path:
    """A CIFAR-10 folder in the npz layout with `train` and `test` random images."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", train, 1), ("test", test, 2)):
        images, labels = fake_images(n, seed)
        np.savez(folder / f"{split}.npz", images=images, labels=labels)
    return folder


def record(run_id: str = "r1", **overrides) -> dict:
    """A results record of a three-epoch run, as results.write_results takes it."""
    epochs = [
        {"epoch": 1, "train_loss": 2.0, "train_acc": 0.2, "test_loss": 2.1, "test_acc": 0.3, "epoch_time_s": 4.0,
         "data_time_s": 1.0, "images_per_s": 100.0},
        {"epoch": 2, "train_loss": 1.5, "train_acc": 0.4, "test_loss": 1.9, "test_acc": 0.5, "epoch_time_s": 2.0,
         "data_time_s": 0.5, "images_per_s": 200.0},
        {"epoch": 3, "train_loss": 1.2, "train_acc": 0.5, "test_loss": 2.0, "test_acc": 0.45, "epoch_time_s": 2.5,
         "data_time_s": 0.5, "images_per_s": 160.0},
    ]
    base = {"schema_version": results.SCHEMA_VERSION, "run_id": run_id, "model": "resnet18", "mode": "single",
            "world_size": 1, "device": "cpu", "config": {}, "epochs": epochs, **results.summarize_epochs(epochs)}
    return {**base, **overrides}
