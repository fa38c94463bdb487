"""GPU and host sampling: NVML (pynvml from nvidia-ml-py) for every NVIDIA GPU, psutil for CPU and RAM.

Everything that touches NVML lives here. When NVML cannot load or start (no driver, no pynvml), the
reason is kept in one line and only CPU and RAM are sampled.
"""

from __future__ import annotations

import csv
import io
import math
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import psutil

from hpml import files
from hpml.errors import UsageError

if TYPE_CHECKING:
    import torch

CSV_FIELDS = ("timestamp", "elapsed_s", "host", "rank", "gpu", "gpu_name", "gpu_util_pct", "mem_used_mib",
              "mem_total_mib", "power_w", "temp_c", "sm_clock_mhz", "cpu_pct", "ram_used_mib", "ram_total_mib")
INT_FIELDS = frozenset({"rank", "gpu", "gpu_util_pct", "temp_c", "sm_clock_mhz"})
TEXT_FIELDS = frozenset({"timestamp", "host", "gpu_name"})
MIB = 2**20


@dataclass(frozen=True)
class Gpu:
    index: int  # NVML's index: the same on every process of the host, whatever CUDA_VISIBLE_DEVICES says
    name: str
    handle: object


def device_gpus(device: torch.device) -> list[int]:
    """The CUDA index of the GPU a process training on `device` uses; none for the CPU (the host alone)."""
    return [device.index or 0] if device.type == "cuda" else []


def _open_nvml(gpu_indices: Sequence[int] | None) -> tuple[ModuleType | None, list[Gpu], str | None]:
    """(pynvml, the GPUs to read, None), or (None, [], a one-line reason) when NVML is not usable."""
    try:
        import pynvml
    except ImportError as error:
        return None, [], f"pynvml is not importable ({error}); install nvidia-ml-py"
    try:
        pynvml.nvmlInit()
    except Exception as error:  # NVMLError when the driver is missing, OSError or others from a broken install
        return None, [], _reason(error)
    try:
        handles = ([pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
                   if gpu_indices is None else [_handle_of_cuda_device(pynvml, i) for i in gpu_indices])
        gpus = [Gpu(pynvml.nvmlDeviceGetIndex(h), _text(pynvml.nvmlDeviceGetName(h)), h) for h in handles]
    except Exception as error:
        pynvml.nvmlShutdown()
        return None, [], _reason(error)
    return pynvml, gpus, None


def first_cuda_gpu_name() -> str | None:
    """NVML's name of the GPU that CUDA numbers 0 in this process, or None where NVML finds none."""
    nvml, gpus, _ = _open_nvml(None if os.environ.get("CUDA_VISIBLE_DEVICES") is None else [0])
    if nvml is None:
        return None
    nvml.nvmlShutdown()
    return gpus[0].name if gpus else None


def _reason(error: Exception) -> str:
    return str(error) if type(error).__name__.startswith("NVMLError") else f"{type(error).__name__}: {error}"


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _handle_of_cuda_device(pynvml: ModuleType, cuda_index: int) -> object:
    """The NVML handle of CUDA device `cuda_index` as this process sees it, through CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return pynvml.nvmlDeviceGetHandleByIndex(cuda_index)
    ids = [part.strip() for part in visible.split(",") if part.strip()]
    if not 0 <= cuda_index < len(ids):
        raise ValueError(f"CUDA device {cuda_index} is not among CUDA_VISIBLE_DEVICES={visible}")
    wanted = ids[cuda_index]
    if wanted.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(wanted))
    for index in range(pynvml.nvmlDeviceGetCount()):  # a UUID or a prefix of one, as CUDA accepts
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        if _text(pynvml.nvmlDeviceGetUUID(handle)).startswith(wanted):
            return handle
    raise ValueError(f"NVML has no GPU with UUID {wanted} (from CUDA_VISIBLE_DEVICES)")


class Sampler:
    """Reads the chosen GPUs (all by default) and the host's CPU and RAM, one call of `read()` per sample.

    CPU % is the average since the previous `read()` (or since construction) in the same thread, so build
    and read a Sampler in one thread.
    """

    def __init__(self, gpu_indices: Sequence[int] | None = None, rank: int | None = None):
        self.rank = rank
        self.host = socket.gethostname()
        self.nvml, self.gpus, self.nvml_error = _open_nvml(gpu_indices)
        self.started = time.monotonic()
        psutil.cpu_percent(interval=None)

    def read(self) -> list[dict]:
        """One sample: a row per GPU, or one row with empty GPU fields when there is none."""
        ram = psutil.virtual_memory()
        host_fields = {
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "elapsed_s": round(time.monotonic() - self.started, 3),
            "host": self.host,
            "rank": self.rank,
            "cpu_pct": psutil.cpu_percent(interval=None),
            "ram_used_mib": round((ram.total - ram.available) / MIB, 1),
            "ram_total_mib": round(ram.total / MIB, 1),
        }
        if not self.gpus:
            return [{field: host_fields.get(field) for field in CSV_FIELDS}]
        return [{field: {**host_fields, **self._read_gpu(gpu)}.get(field) for field in CSV_FIELDS}
                for gpu in self.gpus]

    def _read_gpu(self, gpu: Gpu) -> dict:
        nvml, handle = self.nvml, gpu.handle
        memory = self._field(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        power_mw = self._field(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        return {
            "gpu": gpu.index,
            "gpu_name": gpu.name,
            "gpu_util_pct": self._field(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            "mem_used_mib": None if memory is None else round(memory.used / MIB, 1),
            "mem_total_mib": None if memory is None else round(memory.total / MIB, 1),
            "power_w": None if power_mw is None else round(power_mw / 1000, 1),
            "temp_c": self._field(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            "sm_clock_mhz": self._field(lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
        }

    def _field(self, read: Callable[[], object]) -> object:
        """A reading, or None where the GPU does not support it (or has just gone away)."""
        try:
            return read()
        except self.nvml.NVMLError:
            return None

    def close(self) -> None:
        if self.nvml is not None:
            self.nvml.nvmlShutdown()
            self.nvml = None

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Monitor:
    """Samples in a daemon thread every `interval` seconds while the `with` block runs.

    `gpu_indices` are CUDA device indices as this process sees them (e.g. a rank's local rank); None reads
    every GPU. `rank` fills the rank column. `on_sample(rows)` runs in the thread after each sample. After the
    block: `.samples` (rows), `.nvml_error` and `.summary()`. A run shorter than `interval` still gets one sample.
    """

    def __init__(self, interval: float = 1.0, gpu_indices: Sequence[int] | None = None, rank: int | None = None,
                 on_sample: Callable[[list[dict]], None] | None = None):
        if not (isinstance(interval, (int, float)) and math.isfinite(interval) and interval > 0):
            raise UsageError(f"monitor interval must be a positive number of seconds, got {interval}")
        self.interval = float(interval)
        self.gpu_indices = None if gpu_indices is None else list(gpu_indices)
        self.rank = rank
        self.on_sample = on_sample
        self.samples: list[dict] = []
        self.gpus: list[Gpu] = []
        self.nvml_error: str | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    def start(self) -> Monitor:
        """Start sampling; returns once NVML has been opened (so `.gpus` and `.nvml_error` are known)."""
        self._thread = threading.Thread(target=self._run, name="hpml-monitor", daemon=True)
        self._thread.start()
        self._ready.wait()
        return self

    def stop(self) -> None:
        """Stop and join the thread; re-raises what failed in it (an on_sample callback, say)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._failure is not None:
            raise self._failure

    @property
    def running(self) -> bool:
        """Whether the sampling thread is alive: false once stopped, or once a failure ended it (`stop` re-raises)."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            with Sampler(self.gpu_indices, self.rank) as sampler:
                self.gpus, self.nvml_error = sampler.gpus, sampler.nvml_error
                self._ready.set()
                due = sampler.started
                while True:
                    due = max(due + self.interval, time.monotonic())  # after a late sample, skip missed slots
                    if self._stop.wait(due - time.monotonic()):
                        break
                    self._take(sampler)
                if not self.samples:
                    self._take(sampler)
        except BaseException as error:
            self._failure = error
        finally:
            self._ready.set()

    def _take(self, sampler: Sampler) -> None:
        rows = sampler.read()
        self.samples.extend(rows)
        if self.on_sample is not None:
            self.on_sample(rows)

    def summary(self, samples_csv: str | None = None) -> dict:
        """This monitor's rows summarised (see `summarize`); `samples_csv` names the file they were written to."""
        return summarize(self.samples, self.interval, nvml_error=self.nvml_error, samples_csv=samples_csv)

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        self._stop.set()
        if exc_type is None:
            self.stop()
        elif self._thread is not None:
            self._thread.join()  # the block's own exception matters more than the thread's


def summarize(rows: Iterable[dict], interval_s: float, *, nvml_error: str | None = None,
              samples_csv: str | None = None) -> dict:
    """The `utilization` summary of a results record, from rows of one or many ranks.

    `nvml` is true when `nvml_error` is None. Per GPU (a host's GPU seen by one rank): mean and max
    utilization, peak memory used. The totals pool every GPU: mean and max utilization, the largest
    single-GPU peak memory; CPU % is averaged over samples, RAM is the peak. None where nothing was read.
    """
    rows = list(rows)
    per_gpu: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("gpu") is not None:
            per_gpu.setdefault((row.get("host"), row.get("rank"), row["gpu"]), []).append(row)
    samples = {(r.get("host"), r.get("rank"), r.get("timestamp"), r.get("elapsed_s")): r for r in rows}.values()
    gpus = [{
        "rank": rank,
        "gpu": gpu,
        "name": gpu_rows[0].get("gpu_name"),
        "mean_util_pct": _mean(r.get("gpu_util_pct") for r in gpu_rows),
        "max_util_pct": _max(r.get("gpu_util_pct") for r in gpu_rows),
        "peak_mem_mib": _max(r.get("mem_used_mib") for r in gpu_rows),
        "mem_total_mib": _max(r.get("mem_total_mib") for r in gpu_rows),
    } for (_host, rank, gpu), gpu_rows in sorted(per_gpu.items(), key=lambda item: _sort_key(item[0]))]
    gpu_rows = [row for group in per_gpu.values() for row in group]
    return {
        "interval_s": interval_s,
        "samples": len(samples),
        "samples_csv": samples_csv,
        "nvml": nvml_error is None,
        "nvml_error": nvml_error,
        "gpus": gpus,
        "mean_gpu_util_pct": _mean(r.get("gpu_util_pct") for r in gpu_rows),
        "max_gpu_util_pct": _max(r.get("gpu_util_pct") for r in gpu_rows),
        "peak_gpu_mem_mib": _max(r.get("mem_used_mib") for r in gpu_rows),
        "mean_cpu_pct": _mean(r.get("cpu_pct") for r in samples),
        "peak_ram_mib": _max(r.get("ram_used_mib") for r in samples),
    }


def _sort_key(key: tuple) -> tuple:
    host, rank, gpu = key
    return (-1 if rank is None else rank, host or "", gpu)


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.fmean(present), 2) if present else None


def _max(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def check_csv_path(path: str | Path) -> Path:
    """Prove samples can be appended to `path` (creating its folder and an empty file); UsageError otherwise."""
    path = files.check_output_file(path, "--csv")
    try:
        with open(path, "a", newline="", encoding="utf-8"):
            pass
    except OSError as error:
        raise UsageError(f"--csv {path} is not writable: {error.strerror or error}") from None
    _check_header(path)
    return path


def _check_header(path: Path) -> None:
    """UsageError unless `path` is empty or starts with the samples header (so nothing is appended to another file,
    text or binary)."""
    with open(path, "rb") as file:
        first = file.readline()
    if first and first.rstrip(b"\r\n") != ",".join(CSV_FIELDS).encode():
        raise UsageError(f"{path} already holds something other than utilization samples (its header differs)")


def write_samples_csv(path: str | Path, rows: Iterable[dict], append: bool = False) -> Path:
    """Write rows in the CSV_FIELDS format. append=True adds to an existing file (header only when it is new
    or empty); append=False replaces the file atomically (temp file, then rename)."""
    path = Path(path)
    if not append:
        return files.write_atomic(path, lambda tmp: _write_rows(tmp, "w", rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        _check_header(path)
    return _write_rows(path, "a", rows)


def _write_rows(path: Path, mode: str, rows: Iterable[dict]) -> Path:
    """Write (mode "w") or append (mode "a") rows, with the header when the file starts empty; UTF-8 whatever the
    locale, so that a GPU's or a host's name reads back the same on any machine."""
    with open(path, mode, newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if file.tell() == 0:
            writer.writeheader()
        writer.writerows(rows)
    return path


def read_samples_csv(path: str | Path) -> list[dict]:
    """Rows of a samples CSV (UTF-8, as written) with numbers parsed (int or float) and empty fields as None."""
    with io.TextIOWrapper(files.open_regular(path), encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file)
        if tuple(reader.fieldnames or ()) != CSV_FIELDS:
            raise ValueError(f"{path}: not a utilization samples CSV (header {reader.fieldnames})")
        return [{field: _parse(field, row[field]) for field in CSV_FIELDS} for row in reader]


def _parse(field: str, text: str | None) -> object:
    if text is None or text == "":
        return None
    if field in TEXT_FIELDS:
        return text
    return int(text) if field in INT_FIELDS else float(text)
