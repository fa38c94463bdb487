"""hpml as a user installs it, without the checkout: built by pip, installed outside the checkout, and run from
another folder with nothing of the checkout on the path. The default run installs it (without its dependencies,
which this Python has) into a folder of its own; `pytest -m slow` into a fresh virtual environment, with its
extras from the package index."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import AWS_VARIABLES, REPO

SOURCES = ("pyproject.toml", "hpml", "models")  # what a build of the package reads
# Every console script, and whether it needs torch.
CONSOLE_SCRIPTS = {"hpml-run-hpc": True, "hpml-run-distributed": True, "hpml-sagemaker": False, "hpml-plot": False,
                   "hpml-study": False, "hpml-utilization": False, "hpml-cifar10-download": False}
DRY_RUN = ("submit", "--dry-run", "--region", "us-east-1", "--model", "resnet,densenet", "--dataset", "synthetic",
           "--epochs", "3")
LISTED_REQUIREMENTS = "its requirements.txt lists tqdm>=4.64, psutil>=5.9, nvidia-ml-py>=12.535,"  # a job's
STUDY = ("--models", "resnet18", "--world-sizes", "1,2", "--dataset", "synthetic", "--subset", "64", "--batch-size",
         "16", "--epochs", "1", "--workers", "0", "--quiet", "--output-dir", "results", "--figures-dir", "figures")
# Where an import of torch, or torchvision, ends: a note in $HPML_TORCH_IMPORTED, then ImportError.
BLOCKED = ('import os\nwith open(os.environ["HPML_TORCH_IMPORTED"], "a") as note:\n    note.write(__name__ + "\\n")\n'
           'raise ImportError(f"{__name__} is blocked: this must run without torch")\n')
# As each process ends, the file of its main module ('-' for none), then those of the hpml and models modules it
# imported, one a line, into $HPML_IMPORTS/<pid>.
RECORD_IMPORTS = """import atexit, os, sys

def record():
    files = [getattr(sys.modules["__main__"], "__file__", None) or "-"]
    files += [module.__file__ for name, module in list(sys.modules.items())
              if name.partition(".")[0] in ("hpml", "models") and getattr(module, "__file__", None)]
    with open(os.path.join(os.environ["HPML_IMPORTS"], str(os.getpid())), "w") as imported:
        imported.write("\\n".join(files))

atexit.register(record)
"""


def copy_sources(folder: Path) -> Path:
    """The checkout's sources of the package, copied into `folder`: a build in the checkout would leave build/ and
    hpml.egg-info there (and a stale build/ goes into the next wheel)."""
    folder.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, folder / name)
    return folder


def outside_the_checkout(folder: Path, pythonpath: list[Path], **more: str) -> dict[str, str]:
    """This environment with no AWS configuration, PYTHONPATH `pythonpath` only (none when empty), and `more`."""
    env = {name: value for name, value in os.environ.items() if name not in (*AWS_VARIABLES, "PYTHONPATH")}
    return {**env, **({"PYTHONPATH": os.pathsep.join(map(str, pythonpath))} if pythonpath else {}),
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(folder / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(folder / "no-aws-credentials"), **more}


def torch_blocked(folder: Path) -> tuple[Path, Path]:
    """A folder to put first on PYTHONPATH, where importing torch or torchvision fails, and the file that notes
    each such import."""
    for package in ("torch", "torchvision"):
        (folder / "no-torch" / package).mkdir(parents=True)
        (folder / "no-torch" / package / "__init__.py").write_text(BLOCKED)
    return folder / "no-torch", folder / "torch-imported"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """hpml installed by this Python's pip and setuptools, without dependencies or the index, into a folder of its
    own (its console scripts in bin/)."""
    root = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--disable-pip-version-check", "--target", str(root / "site"),
                    str(copy_sources(root / "source"))], check=True, capture_output=True, text=True, timeout=300)
    return root / "site"


def test_every_script_is_a_console_script_of_the_installed_package(installed, tmp_path):
    """Each one's --help, where torch cannot be imported for those that need none."""
    (distribution,) = importlib.metadata.distributions(path=[str(installed)])
    assert sorted(entry.name for entry in distribution.entry_points if entry.group == "console_scripts") == sorted(
        CONSOLE_SCRIPTS)
    blocked, note = torch_blocked(tmp_path)
    running = {name: subprocess.Popen([str(installed / "bin" / name), "--help"], cwd=tmp_path, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env=outside_the_checkout(tmp_path, [installed] if needs_torch else
                                                               [blocked, installed], HPML_TORCH_IMPORTED=str(note)))
               for name, needs_torch in CONSOLE_SCRIPTS.items()}
    for name, process in running.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0 and out.startswith(f"usage: {name} "), (name, out, err)
    assert not note.exists(), note.read_text()


def test_the_installed_client_submits_a_dry_run_without_torch(installed, tmp_path):
    blocked, note = torch_blocked(tmp_path)
    done = subprocess.run([str(installed / "bin" / "hpml-sagemaker"), *DRY_RUN], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120,
                          env=outside_the_checkout(tmp_path, [blocked, installed], HPML_TORCH_IMPORTED=str(note)))
    assert done.returncode == 0, done.stderr
    assert not note.exists(), note.read_text()
    assert (f"run_hpc.py: the hpml and models packages this client imports, from {installed}, and the entry "
            f"scripts; {LISTED_REQUIREMENTS}") in done.stdout
    assert '"sagemaker_program": "\\"run_distributed.py\\""' in done.stdout


def test_a_study_of_the_installed_package_runs_its_cells_from_it(installed, tmp_path):
    """Both cells, the single process and torchrun's two, import hpml and models from the install only."""
    audit, imports = tmp_path / "audit", tmp_path / "imports"
    audit.mkdir()
    imports.mkdir()
    (audit / "sitecustomize.py").write_text(RECORD_IMPORTS)
    done = subprocess.run([str(installed / "bin" / "hpml-study"), *STUDY], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300,
                          env=outside_the_checkout(tmp_path, [audit, installed], HPML_IMPORTS=str(imports)))
    assert done.returncode == 0, done.stdout + done.stderr
    records = [json.loads(path.read_text()) for path in (tmp_path / "results").glob("*.json")]
    assert sorted((record["world_size"], record["mode"]) for record in records) == [(1, "single"),
                                                                                   (2, "distributed")]
    assert (tmp_path / "figures" / "Speedup.png").is_file() and (tmp_path / "figures" / "summary.md").is_file()
    imported = [list(map(Path, pid.read_text().split())) for pid in imports.iterdir()]
    mains = sorted(str(files[0].relative_to(installed)) for files in imported if files[0].is_relative_to(installed))
    assert mains == ["bin/hpml-study", "hpml/scripts/run_distributed.py", "hpml/scripts/run_distributed.py",
                     "hpml/scripts/run_hpc.py"]  # the study, its single-device cell and torchrun's two ranks
    assert [path for files in imported for path in files[1:] if not path.is_relative_to(installed)] == []
    assert any(installed / "models" / "resnet.py" in files for files in imported)


@pytest.mark.slow
def test_a_fresh_virtual_environment_installs_the_client_then_training(tmp_path):
    """pip install 'hpml[client]' from the package index: a dry run, and no torch; then 'hpml[train]', with this
    environment's torch and torchvision (not a newer release to download), and a tiny study."""
    source = copy_sources(tmp_path / "source")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, f"{source}[client]"], check=True, timeout=900)
    env = outside_the_checkout(tmp_path, [])
    done = subprocess.run([str(venv / "bin" / "hpml-sagemaker"), *DRY_RUN], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert LISTED_REQUIREMENTS in done.stdout
    no_torch = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True, timeout=60)
    assert no_torch.returncode == 1 and b"No module named 'torch'" in no_torch.stderr

    constraints = tmp_path / "constraints.txt"
    constraints.write_text("".join(f"{name}=={importlib.metadata.version(name)}\n"
                                   for name in ("torch", "torchvision")))
    subprocess.run([*pip, f"{source}[train]", "--constraint", str(constraints)], check=True, timeout=1800)
    done = subprocess.run([str(venv / "bin" / "hpml-study"), *STUDY], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(list((tmp_path / "results").glob("*.json"))) == 2 and (tmp_path / "figures" / "Speedup.png").is_file()
