"""The speed settings of a run (precision, memory layout, compile), resolved for the device at hand."""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import TrainConfig
from .errors import UsageError

# The classic pipeline the fast defaults are measured against (TrainConfig fields): a DataLoader with 2 worker
# processes and torchvision transforms, fp32, eager, NCHW.
REFERENCE_SETUP = {"loader": "torch", "workers": 2, "precision": "fp32", "channels_last": False, "compile": False,
                   "cuda_graphs": False}
ACCUMULATE_GRAD_STREAM_WARNING = "The AccumulateGrad node's stream does not match"


@dataclass
class SpeedSettings:
    loader: str
    precision: str
    channels_last: bool
    compile: bool
    cuda_graphs: bool

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: CPUs on which bf16 autocast is faster than fp32 (bench/README.md has the figures)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def auto_precision(device: torch.device) -> str:
    """What --precision auto trains in: bf16 where the hardware computes it natively (GPUs of compute capability
    8.0 and up, CPUs with AVX512-BF16 or AMX), fp16 with a gradient scaler on the older tensor-core GPUs (7.x: V100,
    T4), fp32 otherwise. torch.cuda.is_bf16_supported() is no guide: since torch 2.2 it is also true where bf16 is
    only emulated, which is slower than fp16 there."""
    if device.type != "cuda":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    major, _ = torch.cuda.get_device_capability(device)
    return "bf16" if major >= 8 else "fp16" if major >= 7 else "fp32"


def resolve(cfg: TrainConfig, device: torch.device, world_size: int = 1) -> SpeedSettings:
    """Fill in the per-device defaults and refuse settings this device or torch cannot run.

    CUDA graphs default to on for one CUDA process (not compiling) and off in a data-parallel world: a graphed
    backward is one autograd node, so DDP could start no gradient bucket's all-reduce before the whole backward
    had finished, and the overlap of communication with computation that data-parallel training is measured on
    would be lost.
    """
    precision = auto_precision(device) if cfg.precision == "auto" else cfg.precision
    if precision == "fp16" and device.type == "cpu" and not hasattr(torch.amp, "GradScaler"):
        raise UsageError("--precision fp16 on the CPU needs torch >= 2.3 (a CPU gradient scaler); use bf16 or fp32")
    if cfg.compile:
        check_compile_supported(device)
    channels_last = True if cfg.channels_last is None else cfg.channels_last
    cuda_graphs = (device.type == "cuda" and not cfg.compile and world_size == 1 if cfg.cuda_graphs is None
                   else cfg.cuda_graphs)
    if cuda_graphs and device.type != "cuda":
        raise UsageError(f"--cuda-graphs needs a CUDA device, got {device.type}; drop it or use --device cuda")
    if cuda_graphs and cfg.compile:
        raise UsageError("--cuda-graphs and --compile cannot be combined; choose one")
    return SpeedSettings(cfg.loader, precision, channels_last, cfg.compile, cuda_graphs)


def check_compile_supported(device: torch.device) -> None:
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise UsageError(f"--compile: torch.compile does not support this Python/torch ({torch.__version__}); "
                         "drop --compile")
    if device.type == "cpu" and not shutil.which(os.environ.get("CXX", "g++")):
        raise UsageError("--compile on the CPU needs a C++ compiler (g++, or $CXX); install one or drop --compile")


def autocast(settings: SpeedSettings, device: torch.device) -> contextlib.AbstractContextManager:
    if settings.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if settings.precision == "bf16" else torch.float16
    # A CUDA graph must record every cast, so autocast may not reuse casts from its cache.
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=not settings.cuda_graphs)


def grad_scaler(settings: SpeedSettings, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs its loss scaled so that small gradients do not flush to zero; bf16 and fp32 do not."""
    if settings.precision != "fp16":
        return None
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler()


def prepare_model(model: nn.Module, settings: SpeedSettings) -> nn.Module:
    return model.to(memory_format=torch.channels_last) if settings.channels_last else model


class GraphedModel(nn.Module):
    """The model's training forward and backward captured once as CUDA graphs, replayed for every full batch.

    Eager PyTorch launches a few hundred small kernels per step, and on a fast GPU the Python that launches
    them becomes the bottleneck; a replay is one launch. Batches of another size (an epoch's last, partial
    batch) and evaluation run the model eagerly. The optimizer step stays eager.
    """

    def __init__(self, model: nn.Module, batch: Tensor, autocast: contextlib.AbstractContextManager) -> None:
        super().__init__()
        self.model, self.batch_shape = model, batch.shape
        self.eager_forward = model.forward
        state = [tensor.clone() for tensor in model.state_dict().values()]
        model.train()
        with autocast, warnings.catch_warnings():
            # torch < 2.12 warms up and captures on different streams and then warns about its own warm-up's
            # autograd nodes (fixed by pytorch/pytorch#187745); the captured graphs are not affected.
            warnings.filterwarnings("ignore", message=ACCUMULATE_GRAD_STREAM_WARNING)
            torch.cuda.make_graphed_callables(model, (batch,))  # replaces model.forward in training mode
        with torch.no_grad():  # the capture's warm-up steps moved BatchNorm's running statistics: put them back
            for tensor, saved in zip(model.state_dict().values(), state, strict=True):
                tensor.copy_(saved)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.model(inputs) if inputs.shape == self.batch_shape else self.eager_forward(inputs)
