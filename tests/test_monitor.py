"""hpml.monitor: the CPU-only path, NVML failing to load, a GPU path through a stand-in pynvml, the CSV format,
the summary, and the background Monitor starting and stopping."""

import importlib.util
import os
import subprocess
import sys
import threading
import time

import pytest

from hpml import monitor
from hpml.errors import UsageError
from tests.helpers import FAKE_PYNVML, REPO


@pytest.fixture
def fake_nvml(monkeypatch):
    """The stand-in pynvml (a fresh copy), importable as `pynvml` in this process."""
    spec = importlib.util.spec_from_file_location("pynvml", FAKE_PYNVML)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return module


class FailingInit:
    """A pynvml whose nvmlInit fails as it does on a machine without the driver."""

    class NVMLError(Exception):
        pass

    class NVMLError_DriverNotLoaded(NVMLError):
        def __str__(self) -> str:
            return "Driver Not Loaded"

    def nvmlInit(self) -> None:
        raise self.NVMLError_DriverNotLoaded()


def assert_host_only(rows):
    (row,) = rows
    assert tuple(row) == monitor.CSV_FIELDS
    assert all(row[field] is None for field in ("gpu", "gpu_name", "gpu_util_pct", "mem_used_mib", "power_w"))
    assert 0 <= row["cpu_pct"] <= 100
    assert 0 < row["ram_used_mib"] < row["ram_total_mib"]


def test_nvml_not_importable_falls_back_to_cpu_and_ram(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with monitor.Sampler() as sampler:
        assert sampler.gpus == [] and sampler.nvml is None
        assert "nvidia-ml-py" in sampler.nvml_error and "\n" not in sampler.nvml_error
        assert_host_only(sampler.read())


def test_nvml_init_failing_falls_back_to_cpu_and_ram(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FailingInit())
    with monitor.Monitor(interval=0.05, rank=3) as sampling:
        time.sleep(0.2)
    assert sampling.nvml_error == "Driver Not Loaded"
    summary = sampling.summary()
    assert summary["nvml"] is False and summary["nvml_error"] == "Driver Not Loaded"
    assert summary["gpus"] == [] and summary["mean_gpu_util_pct"] is None and summary["peak_gpu_mem_mib"] is None
    assert summary["mean_cpu_pct"] is not None and summary["peak_ram_mib"] > 0
    assert {row["rank"] for row in sampling.samples} == {3}


def test_this_machine_without_a_driver_samples_cpu_and_ram():
    with monitor.Sampler() as sampler:
        if sampler.gpus:
            pytest.skip("this machine has an NVIDIA GPU")
        assert sampler.nvml_error
        time.sleep(0.05)
        assert_host_only(sampler.read())


def test_gpu_rows_from_nvml(fake_nvml):
    with monitor.Sampler(rank=0) as sampler:
        assert fake_nvml.initialised == 1 and sampler.nvml_error is None
        assert [(gpu.index, gpu.name) for gpu in sampler.gpus] == [(0, "Fake GPU 80GB"), (1, "Fake GPU 16GB")]
        first, second = sampler.read()
    assert fake_nvml.initialised == 0  # closed
    assert first["timestamp"] == second["timestamp"] and first["cpu_pct"] == second["cpu_pct"]
    assert first["rank"] == 0 and (first["gpu"], second["gpu"]) == (0, 1)
    assert (first["mem_used_mib"], first["mem_total_mib"]) == (10240.0, 81920.0)
    assert (first["power_w"], first["temp_c"], first["sm_clock_mhz"]) == (300.5, 60, 1980)
    assert second["power_w"] is None and second["temp_c"] == 61  # power not supported on that board


@pytest.mark.parametrize("visible, cuda_index, nvml_index", [
    (None, 1, 1), ("1", 0, 1), ("1,0", 1, 0), ("GPU-aaaa", 0, 0), ("GPU-bbbb2222,GPU-a", 0, 1),
    ("GPU-bbbb2222,GPU-a", 1, 0)])
def test_cuda_device_index_maps_to_nvml_through_cuda_visible_devices(fake_nvml, monkeypatch, visible, cuda_index,
                                                                      nvml_index):
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with monitor.Sampler(gpu_indices=[cuda_index]) as sampler:
        assert [gpu.index for gpu in sampler.gpus] == [nvml_index]
        assert [row["gpu"] for row in sampler.read()] == [nvml_index]


def test_cuda_device_missing_from_nvml_is_a_reason_not_a_crash(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-cccc")
    with monitor.Sampler(gpu_indices=[0]) as sampler:
        assert sampler.gpus == [] and "GPU-cccc" in sampler.nvml_error
        assert_host_only(sampler.read())
    assert fake_nvml.initialised == 0


def test_monitor_thread_starts_samples_and_stops(fake_nvml):
    before = {thread.ident for thread in threading.enumerate()}
    with monitor.Monitor(interval=0.05, gpu_indices=[1], rank=2) as sampling:
        (thread,) = [t for t in threading.enumerate() if t.ident not in before]
        assert thread.daemon and thread.is_alive()
        time.sleep(0.3)
    assert not thread.is_alive()
    taken = len(sampling.samples)
    assert 2 <= taken <= 7  # about 6 at 0.05 s over 0.3 s; fewer when the machine is busy
    time.sleep(0.1)
    assert len(sampling.samples) == taken  # nothing sampled after the block
    assert {(row["rank"], row["gpu"]) for row in sampling.samples} == {(2, 1)}
    elapsed = [row["elapsed_s"] for row in sampling.samples]
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0.049  # the first sample is due after one interval
    (gpu,) = sampling.summary(samples_csv="run.utilization.csv")["gpus"]
    assert gpu["rank"] == 2 and gpu["gpu"] == 1 and gpu["name"] == "Fake GPU 16GB"
    assert fake_nvml.initialised == 0


def test_monitor_shorter_than_its_interval_still_takes_one_sample(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    started = time.monotonic()
    with monitor.Monitor(interval=30) as sampling:
        pass
    assert time.monotonic() - started < 5  # stopping does not wait for the interval
    assert len(sampling.samples) == 1


def test_monitor_reraises_a_failing_callback_and_keeps_the_blocks_own_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)

    def fail(rows):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"), monitor.Monitor(interval=0.02, on_sample=fail):
        time.sleep(0.1)
    with pytest.raises(KeyError), monitor.Monitor(interval=0.02, on_sample=fail):
        time.sleep(0.1)
        raise KeyError("the training loop's error")


@pytest.mark.parametrize("interval", [0, -1, float("nan"), float("inf")])
def test_monitor_rejects_a_bad_interval(interval):
    with pytest.raises(UsageError, match="positive number of seconds"):
        monitor.Monitor(interval=interval)


def row(rank, gpu, util, mem, cpu, ram, elapsed, host="node1"):
    return {"host": host, "rank": rank, "gpu": gpu, "gpu_name": None if gpu is None else "G", "elapsed_s": elapsed,
            "gpu_util_pct": util, "mem_used_mib": mem, "mem_total_mib": None if gpu is None else 1000.0,
            "cpu_pct": cpu, "ram_used_mib": ram}


def test_summary_of_rows_gathered_from_two_ranks():
    rows = [row(0, 0, 80, 500.0, 50.0, 2000.0, 1.0), row(1, 1, 40, 300.0, 50.0, 2000.0, 1.0),
            row(0, 0, 100, 700.0, 70.0, 2500.0, 2.0), row(1, 1, None, 200.0, 70.0, 2400.0, 2.0)]
    summary = monitor.summarize(rows, 1.0, samples_csv="x.utilization.csv")
    assert summary["interval_s"] == 1.0 and summary["samples"] == 4 and summary["samples_csv"] == "x.utilization.csv"
    assert summary["nvml"] is True and summary["nvml_error"] is None
    assert summary["gpus"] == [
        {"rank": 0, "gpu": 0, "name": "G", "mean_util_pct": 90.0, "max_util_pct": 100, "peak_mem_mib": 700.0,
         "mem_total_mib": 1000.0},
        {"rank": 1, "gpu": 1, "name": "G", "mean_util_pct": 40.0, "max_util_pct": 40, "peak_mem_mib": 300.0,
         "mem_total_mib": 1000.0},
    ]
    assert summary["mean_gpu_util_pct"] == pytest.approx(220 / 3, abs=0.01) and summary["max_gpu_util_pct"] == 100
    assert summary["peak_gpu_mem_mib"] == 700.0
    assert summary["mean_cpu_pct"] == 60.0 and summary["peak_ram_mib"] == 2500.0


def test_summary_counts_samples_not_gpu_rows(fake_nvml):
    with monitor.Sampler() as sampler:
        rows = sampler.read()
        time.sleep(0.01)
        rows += sampler.read()
    summary = monitor.summarize(rows, 0.5)
    assert len(rows) == 4 and summary["samples"] == 2 and [g["gpu"] for g in summary["gpus"]] == [0, 1]
    assert summary["peak_gpu_mem_mib"] == 10240.0  # the largest single GPU, not a sum


def test_summary_without_rows():
    summary = monitor.summarize([], 1.0, nvml_error="Driver Not Loaded")
    assert summary["samples"] == 0 and summary["mean_cpu_pct"] is None and summary["peak_ram_mib"] is None


HEADER = ("timestamp,elapsed_s,host,rank,gpu,gpu_name,gpu_util_pct,mem_used_mib,mem_total_mib,power_w,temp_c,"
          "sm_clock_mhz,cpu_pct,ram_used_mib,ram_total_mib")


def test_csv_header_rows_append_and_read_back(tmp_path, fake_nvml):
    with monitor.Sampler(rank=1) as sampler:
        gpu_rows = sampler.read()
    path = tmp_path / "deep" / "u.csv"
    monitor.write_samples_csv(path, gpu_rows, append=True)
    monitor.write_samples_csv(path, gpu_rows, append=True)
    lines = path.read_text().splitlines()
    assert lines[0] == HEADER and len(lines) == 5 and lines.count(HEADER) == 1
    back = monitor.read_samples_csv(path)
    assert back == gpu_rows + gpu_rows
    assert back[1]["power_w"] is None and isinstance(back[0]["gpu_util_pct"], int)
    monitor.write_samples_csv(path, gpu_rows[:1])  # append=False replaces the file
    assert path.read_text().splitlines()[0] == HEADER and len(monitor.read_samples_csv(path)) == 1
    assert [p.name for p in path.parent.iterdir()] == ["u.csv"]  # no temp file left behind


def test_csv_without_gpu_has_empty_gpu_fields(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with monitor.Sampler() as sampler:
        rows = sampler.read()
    path = monitor.write_samples_csv(tmp_path / "u.csv", rows)
    fields = path.read_text().splitlines()[1].split(",")
    assert fields[2] and fields[3:12] == [""] * 9 and fields[12]
    assert monitor.read_samples_csv(path) == rows


def test_csv_path_checks(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a csv\n")
    with pytest.raises(UsageError, match="a-file is a file, not a folder"):
        monitor.check_csv_path(blocker / "u.csv")
    with pytest.raises(UsageError, match="is a folder"):
        monitor.check_csv_path(tmp_path)
    with pytest.raises(UsageError, match="header differs"):
        monitor.check_csv_path(blocker)
    with pytest.raises(UsageError, match="header differs"):
        monitor.write_samples_csv(blocker, [], append=True)
    assert blocker.read_text() == "not a csv\n"  # never touched
    with pytest.raises(ValueError, match="not a utilization samples CSV"):
        monitor.read_samples_csv(blocker)
    fresh = monitor.check_csv_path(tmp_path / "new" / "u.csv")
    assert fresh.exists() and fresh.read_text() == ""


# Rows with a host named in French, written (appended, then replaced) and read back by a Python whose locale encodes
# ASCII only (LC_ALL=C without Python's UTF-8 mode): every row back, the host as it was, the file UTF-8.
ROUND_TRIP = """
import sys
from hpml import monitor
monitor.socket.gethostname = lambda: "n\\u0153ud-\\u00e9t\\u00e9"
with monitor.Sampler() as sampler:
    rows = sampler.read()
path = sys.argv[1]
monitor.write_samples_csv(path, rows, append=True)
monitor.write_samples_csv(path, rows, append=True)
monitor.write_samples_csv(path + ".replaced", rows)
back = monitor.read_samples_csv(path) + monitor.read_samples_csv(path + ".replaced")
print(len(back) == 3 * len(rows), ascii(sorted({row["host"] for row in back})))
"""


def test_csv_is_utf8_whatever_the_locale(tmp_path):
    path = tmp_path / "u.csv"
    done = subprocess.run([sys.executable, "-c", ROUND_TRIP, str(path)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0"}, timeout=120)
    assert done.returncode == 0, done.stderr
    host = "n\u0153ud-\u00e9t\u00e9"
    assert done.stdout.strip() == f"True {[host]!a}"
    assert f",{host}," in path.read_text(encoding="utf-8")
