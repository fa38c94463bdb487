"""The Python API (hpml/api.py) as a notebook user calls it, and examples/study.ipynb run on a fresh kernel."""

from __future__ import annotations

import subprocess
import sys

import pytest

import hpml
from hpml.errors import UsageError
from tests.helpers import REPO

TINY = {"dataset": "synthetic", "subset": 64, "batch_size": 16, "epochs": 1, "quiet": True}


def test_importing_hpml_loads_no_torch_and_names_the_api():
    code = "import sys, hpml; print(all(hasattr(hpml, name) for name in hpml.API), 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["True", "False"], done.stderr


def test_settings_are_checked_as_the_flags_are():
    with pytest.raises(UsageError, match="--world-sizes takes positive integers .* got 'x'"):
        hpml.plan_study(world_sizes="1,x")
    with pytest.raises(UsageError, match="--epochs must be a positive integer, got -1"):
        hpml.run_training(epochs=-1)
    with pytest.raises(UsageError, match="unrecognized arguments: --colour"):
        hpml.run_training(colour="blue")


def test_one_run_returns_its_record_and_a_study_its_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (record,) = hpml.run_training(model="shufflenetv2", **TINY, output_dir="single")
    assert (record["model"], record["world_size"], len(record["epochs"])) == ("shufflenetv2", 1, 1)
    assert hpml.load_results("single") == [record]
    study = hpml.run_study(models="shufflenetv2", world_sizes="1", **TINY, output_dir="single", figures_dir="img")
    assert study.exit_code == 0 and study.records == [record]  # its one cell was already there
    (row,) = study.rows
    assert (row["model"], row["mode"], row["world size"]) == ("shufflenetv2", "single", "1")
    assert "| " + " | ".join(row.values()) + " |" in (tmp_path / "img" / "summary.md").read_text().splitlines()
    assert {path.name for path in study.figures} >= {"Time.png", "Accuracy.png"}


def test_the_example_notebook_runs_on_a_fresh_kernel(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(REPO / "examples" / "study.ipynb", as_version=4)
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the kernel runs in tmp_path, as from a checkout's root
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "exit code 0" in outputs and "Dry run: nothing was sent to AWS" in outputs
    assert (tmp_path / "notebook-figures" / "Time.png").is_file()
