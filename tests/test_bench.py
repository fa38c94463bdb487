"""bench/throughput.py runs end to end on the CPU and writes the JSON shape the README promises."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_bench(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "b.json"
    command = [sys.executable, str(REPO / "bench" / "throughput.py"), "--model", "shufflenetv2", "--device", "cpu",
               "--batch-size", "16", "--steps", "2", "--repeats", "1", "--json", str(out), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "shufflenetv2" in done.stdout
    return json.loads(out.read_text())


def test_bench_writes_reference_fast_and_their_ratio(tmp_path):
    report = run_bench(tmp_path)
    assert report["device"].startswith("cpu: ")
    figures = report["models"]["shufflenetv2"]
    assert figures["reference_images_per_s"] > 0 and figures["fast_images_per_s"] > 0
    assert figures["speedup"] == pytest.approx(figures["fast_images_per_s"] / figures["reference_images_per_s"])
    assert figures["reference_settings"] == {"loader": "torch", "precision": "fp32", "channels_last": False,
                                             "compile": False, "cuda_graphs": False}
    assert "ablations" not in figures


@pytest.mark.slow  # compiles the model: a minute or more on two cores
def test_bench_ablate_measures_each_setting(tmp_path):
    ablations = run_bench(tmp_path, "--ablate")["models"]["shufflenetv2"]["ablations"]
    assert set(ablations) == {"fast, fp32", "fast, NCHW", "fast, torch loader", "fast + compile"}
    assert all(a["images_per_s"] > 0 for a in ablations.values())
