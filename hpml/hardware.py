"""What a run was measured on and with: the GPU or CPU model, and the speed settings it trained with.

Two runs are one experiment only when these match (besides model, data and length), so a speedup never divides an
A100's time by a V100's, nor a bf16 run's by an fp32 run's. Client layer: imports no torch; the local GPU's name
comes from NVML (hpml.monitor).
"""

from __future__ import annotations

import platform
from pathlib import Path

from . import monitor


def cpu_name() -> str:
    """The CPU model, as /proc/cpuinfo names it (else what Python's platform module knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def of_record(record: dict) -> str:
    """The processor a run trained on: 'GPU NVIDIA A100-SXM4-40GB' or 'CPU AMD EPYC 7B13'."""
    env = record.get("environment") or {}
    if record["device"] == "cuda":
        return f"GPU {env.get('gpu') or 'unknown'}"
    return f"CPU {env.get('cpu') or 'unknown'}"


def local(device: str) -> str:
    """The processor a run started here with --device `device` trains on, in of_record's words: the GPU CUDA
    numbers 0 (as NVML names it), or the CPU for --device cpu and where NVML finds no GPU."""
    gpu = monitor.first_cuda_gpu_name() if device != "cpu" else None
    return f"GPU {gpu}" if gpu else f"CPU {cpu_name()}"


def settings_of(record: dict) -> str:
    """The speed settings a run resolved to, in words: 'bf16, device loader, channels-last, drop last'.
    A field a record predates counts as what runs did before it existed (no CUDA graphs, a partial last batch)."""
    speed, config = record.get("speed") or {}, record.get("config") or {}
    parts = [speed.get("precision") or config.get("precision") or "fp32",
             f"{speed.get('loader') or config.get('loader') or 'torch'} loader",
             "channels-last" if speed.get("channels_last") else "NCHW"]
    if speed.get("cuda_graphs"):
        parts.append("CUDA graphs")
    if speed.get("compile"):
        parts.append("compiled")
    parts.append("drop last" if config.get("drop_last") else "partial last batch")
    return ", ".join(parts)
