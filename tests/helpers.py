"""Helpers the test modules share: run a script as a user would or in this process, read its results, make data.

Fixtures live in conftest.py; plain functions and constants live here, so no test module imports another.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType

import boto3
import numpy as np
import pytest
from moto.server import ThreadedMotoServer

from hpml import cli, results

REPO = Path(__file__).resolve().parent.parent
FAKE_PYNVML = Path(__file__).with_name("fake_pynvml.py")  # a two-GPU stand-in for pynvml


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
if sys.argv[0].endswith(".py"):
    runpy.run_path(sys.argv[0], run_name="__main__")
else:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def signalled_when(command: Sequence[str], env: dict, ready: Callable[[int], bool], sig: int,
                   awaited: str) -> tuple[int, str, str]:
    """Run `command` in the repository with `env` added to this environment, send it `sig` as soon as ready(its pid)
    holds (within a minute, or the test fails naming what was `awaited`); its exit code, stdout and stderr."""
    process = subprocess.Popen(command, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, **env},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not ready(process.pid):
            assert time.monotonic() < deadline and process.poll() is None, f"{awaited} never happened"
            time.sleep(0.002)
        process.send_signal(sig)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    return process.returncode, out, err


def run_without_torch(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts (a .py file) or modules (python -m NAME) in a Python where
    `import torch` (or torchvision) fails."""
    target = str(REPO / script) if script.endswith(".py") else script
    return subprocess.run([sys.executable, "-c", NO_TORCH, target, *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=timeout)


def heavy_packages_imported_by(*modules: str) -> list[str]:
    """Which of torch, torchvision and matplotlib a fresh Python loads when it imports these modules."""
    code = (f"import sys, {', '.join(modules)}\n"
            "print(','.join(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'matplotlib'})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [name for name in done.stdout.strip().split(",") if name]


def started_as(monkeypatch: pytest.MonkeyPatch, program: str) -> None:
    """Make this process look to a script's main like one started as `program` (its file name, or a console script's
    path), not with python -m: what its messages and the commands it prints name."""
    monkeypatch.setattr(sys, "argv", [program])
    monkeypatch.setitem(sys.modules, "__main__", ModuleType("__main__"))


def exit_code_of(main: Callable, argv: Sequence[str]) -> int:
    """Run a script's main(argv) in this process through cli.run_script, as its __main__ does; the exit code."""
    with pytest.raises(SystemExit) as stop:
        cli.run_script(main, list(argv))
    return stop.value.code


def refusal(main: Callable, argv: Sequence[str], capsys: pytest.CaptureFixture) -> str:
    """The one line a script's main(argv) prints on stderr when it refuses its input with exit code 2."""
    capsys.readouterr()
    assert exit_code_of(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


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


def record(run_id: str = "r1", epoch_times: tuple[float, ...] = (4.0, 2.0, 2.5), **overrides) -> dict:
    """A results record of a three-epoch run (or as many epochs as `epoch_times` gives the times of), as
    results.write_results takes it: 400 images an epoch."""
    accuracies = [(0.2, 0.3), (0.4, 0.5), *[(0.5, 0.45)] * (len(epoch_times) - 2)]
    epochs = [{"epoch": number, "train_loss": 2.0 / number, "train_acc": train_acc, "test_loss": 2.0,
               "test_acc": test_acc, "epoch_time_s": seconds, "data_time_s": seconds / 4,
               "images_per_s": 400 / seconds}
              for number, (seconds, (train_acc, test_acc)) in enumerate(
                  zip(epoch_times, accuracies[:len(epoch_times)], strict=True), start=1)]
    base = {"schema_version": results.SCHEMA_VERSION, "run_id": run_id, "model": "resnet18", "mode": "single",
            "world_size": 1, "device": "cpu", "config": {}, "epochs": epochs, **results.summarize_epochs(epochs)}
    return {**base, **overrides}



def gpu_record(run_id: str, gpu: str, world_size: int = 1, precision: str = "bf16", **more) -> dict:
    """A record of a run on one GPU (world size 1) or a data-parallel run over `world_size` GPUs of model `gpu`."""
    return record(run_id, device="cuda", world_size=world_size, mode="single" if world_size == 1 else "distributed",
                  backend=None if world_size == 1 else "nccl", environment={"gpu": gpu},
                  speed={"precision": precision, "loader": "device", "channels_last": True, "cuda_graphs": False,
                         "compile": False}, config={"drop_last": True}, **more)

AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION",
                 "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE", "HPML_SAGEMAKER_ROLE",
                 "HPML_CIFAR10")


def no_aws_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No credentials, profile or region from this machine: only what a test sets."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@contextlib.contextmanager
def moto_account(tmp_path: Path, bucket: str, region: str = "us-east-1") -> Iterator[boto3.Session]:
    """A moto server on 127.0.0.1 with an empty account, dummy credentials and a bucket; while it runs, this
    process's AWS settings (and those of what it starts) point at it, and nowhere else."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request lines in the captured output
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # moto keeps its accounts in the process, whichever server started them: begin with an empty one.
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST"), timeout=30)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            no_aws_config(monkeypatch, tmp_path)
            monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            monkeypatch.setenv("AWS_DEFAULT_REGION", region)
            session = boto3.Session()
            session.client("s3").create_bucket(Bucket=bucket)
            yield session
    finally:
        server.stop()
