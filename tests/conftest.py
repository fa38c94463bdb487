"""Shared test helpers: run a script as a user would, and write small data sets in the real on-disk formats."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hpml import cli  # noqa: E402


def run_script(script: str, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts in a subprocess, as a user would from a shell."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


NO_TORCH = """
import runpy, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"import of {name} blocked: this must run without torch")

sys.meta_path.insert(0, NoTorch())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_without_torch(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts in a Python where `import torch` (or torchvision) fails."""
    return subprocess.run([sys.executable, "-c", NO_TORCH, str(REPO / script), *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=timeout)


def exit_code_of(main: Callable, argv: Sequence[str]) -> int:
    """Run a script's main(argv) in this process through cli.run_script, as its __main__ does; the exit code."""
    with pytest.raises(SystemExit) as stop:
        cli.run_script(main, list(argv))
    return stop.value.code


def results_in(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def fake_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10


@pytest.fixture
def npz_dir(tmp_path: Path) -> Path:
    """A tiny CIFAR-10 folder in the npz layout (200 train / 50 test images)."""
    folder = tmp_path / "npz"
    folder.mkdir()
    for split, n, seed in (("train", 200, 1), ("test", 50, 2)):
        images, labels = fake_images(n, seed)
        np.savez(folder / f"{split}.npz", images=images, labels=labels)
    return folder


@pytest.fixture
def batches_dir(tmp_path: Path) -> Path:
    """A tiny CIFAR-10 folder in torchvision's cifar-10-batches-py layout (5 x 20 train / 30 test)."""
    folder = tmp_path / "tv" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for index, name in enumerate(names):
        images, labels = fake_images(30 if name == "test_batch" else 20, index)
        batch = {b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), b"labels": labels.tolist()}
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file)
    return folder.parent
