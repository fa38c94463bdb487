"""Fixtures shared by the test modules: small data sets in the real on-disk formats. Plain helpers: tests/helpers.py."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers import fake_images, write_npz
from tests.slurm_cluster import SlurmCluster, missing


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, one torch thread per worker, and for the scripts it starts (OMP_NUM_THREADS): workers
    that each ran a thread per core would share the cores, and torch's threads slow down many times over when
    they have to wait for one (as torchrun gives each rank one thread)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture
def npz_dir(tmp_path: Path) -> Path:
    """A tiny CIFAR-10 folder in the npz layout (200 train / 50 test images)."""
    return write_npz(tmp_path / "npz", train=200, test=50)


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


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A real SLURM cluster, a controller and two nodes of 4 CPUs in namespaces of their own (tests/slurm_cluster.py),
    one per test process: room for a study's jobs at once. Skipped without root, namespaces or the packages; under
    CI=true that is a failure instead."""
    why = missing()
    if why:
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(f"no SLURM test cluster: {why}")
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=4) as cluster:
        yield cluster
