"""How a step runs fast: the speed settings of a run (precision, memory layout, CUDA graphs, compile), resolved for
the device at hand, and the loaders that bring batches to it (device-resident, or the DataLoader pipeline).

Both loaders take their order from DistributedSampler and their crops and flips from Augmentation, so for the same
seed and epoch they produce the same images; they differ only in where the work runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from hpml.config import TrainConfig
from hpml.data import ImageSet
from hpml.errors import UsageError

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


# The loaders.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CROP_PADDING = 4
IMAGE_SIZE = 32
# Evaluation batches: any size gives the same sums (BatchNorm in eval mode). Big is fast on a GPU; on a CPU a
# 1000-image batch's activations outgrow the caches, and 200 evaluates twice as fast.
EVAL_BATCH_SIZE = {"cuda": 1000, "cpu": 200}
AUGMENT_CHUNK = 32  # batches the device loader crops and flips in one go, so a step costs no extra launches


@dataclass
class Augmentation:
    """One epoch's random crop offsets (0..8 into the image padded by 4) and flips, one per training image.

    Drawn from (seed, epoch) alone, so an image gets the same crop and flip whichever rank, loader or
    world size processes it: runs resume exactly, and N ranks see what one process would see.
    """

    top: np.ndarray
    left: np.ndarray
    flip: np.ndarray

    @classmethod
    def draw(cls, seed: int, epoch: int, size: int) -> Augmentation:
        rng = np.random.default_rng([seed, epoch, 0xA06])
        top, left = rng.integers(0, 2 * CROP_PADDING + 1, size=(2, size))
        return cls(top, left, rng.random(size) < 0.5)


class AugmentedImages(Dataset):
    """The classic pipeline: one PIL image at a time through torchvision's pad, crop, flip and normalise."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        from torchvision import transforms  # here, not at the top: importing torchvision costs seconds per process

        self.images, self.labels = images, labels
        self.augmentation: Augmentation | None = None
        self.to_normalized_tensor = transforms.Compose([
            transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from torchvision.transforms import functional as TF

        aug = self.augmentation
        image = TF.pad(Image.fromarray(self.images[index]), CROP_PADDING)
        image = TF.crop(image, int(aug.top[index]), int(aug.left[index]), IMAGE_SIZE, IMAGE_SIZE)
        if aug.flip[index]:
            image = TF.hflip(image)
        return self.to_normalized_tensor(image), int(self.labels[index])


class Normalize:
    """uint8 NCHW -> float NCHW with CIFAR-10's channel mean and std (kept on the device: no copy per batch)."""

    def __init__(self, device: torch.device) -> None:
        self.mean = torch.tensor(CIFAR10_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CIFAR10_STD, device=device).view(1, 3, 1, 1)

    def __call__(self, pixels: Tensor) -> Tensor:
        return (pixels.float() / 255 - self.mean) / self.std


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


@dataclass(frozen=True)
class BatchPlan:
    """How the training set is dealt out: batch size, shuffle seed, this rank's shard, and the partial last batch."""

    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    drop_last: bool = False


class TrainBatches:
    """This rank's shard of the training set, reshuffled every epoch, as augmented batches on the device."""

    def __init__(self, images: ImageSet, plan: BatchPlan, device: torch.device, channels_last: bool = False) -> None:
        self.size = len(images.train_labels)
        self.sampler = DistributedSampler(range(self.size), num_replicas=plan.world_size, rank=plan.rank,
                                          shuffle=True, seed=plan.seed)
        self.batch_size, self.seed, self.device = plan.batch_size, plan.seed, device
        shard = len(self.sampler)
        self.epoch_size = shard - shard % plan.batch_size if plan.drop_last else shard  # images per epoch
        self.memory_format = memory_format(channels_last)
        self.augmentation = Augmentation.draw(plan.seed, 0, self.size)
        self.skip = 0

    def __len__(self) -> int:
        return -(-(self.epoch_size - self.skip) // self.batch_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Deal this epoch's shard and augmentation; skip its first batches when resuming mid-epoch."""
        self.sampler.set_epoch(epoch)
        self.augmentation = Augmentation.draw(self.seed, epoch, self.size)
        self.skip = skip_batches * self.batch_size

    def epoch_order(self) -> list[int]:
        return list(self.sampler)[self.skip:self.epoch_size]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        raise NotImplementedError


class TorchTrainBatches(TrainBatches):
    """The classic pipeline: a DataLoader runs torchvision's transforms in `workers` processes."""

    def __init__(self, images: ImageSet, plan: BatchPlan, device: torch.device, channels_last: bool = False,
                 workers: int = 2) -> None:
        super().__init__(images, plan, device, channels_last)
        self.dataset = AugmentedImages(images.train_images, images.train_labels)
        self.workers = workers

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.dataset.augmentation = self.augmentation
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.epoch_order(),
                            num_workers=self.workers, pin_memory=self.device.type == "cuda", drop_last=False)
        for inputs, targets in loader:
            inputs = inputs.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            yield inputs, targets.to(self.device, non_blocking=True)


class DeviceTrainBatches(TrainBatches):
    """The whole training set on the device as one uint8 tensor; crop, flip and normalise run there in batches.

    Every rank keeps all images (150 MB for CIFAR-10) because the per-epoch shuffle deals each rank a new
    shard; the shard itself is DistributedSampler's, as in the classic pipeline.
    """

    def __init__(self, images: ImageSet, plan: BatchPlan, device: torch.device, channels_last: bool = False) -> None:
        super().__init__(images, plan, device, channels_last)
        pixels = torch.from_numpy(images.train_images).to(device).permute(0, 3, 1, 2)
        self.padded = F.pad(pixels, [CROP_PADDING] * 4)  # zeros, like torchvision's pad
        self.labels = torch.from_numpy(images.train_labels).to(device)
        self.window = torch.arange(IMAGE_SIZE, device=device)
        self.channels = torch.arange(3, device=device)[None, :, None, None]
        self.normalize = Normalize(device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.tensor(self.epoch_order(), dtype=torch.int64, device=self.device)
        top, left, flip = (torch.from_numpy(a).to(self.device) for a in
                           (self.augmentation.top, self.augmentation.left, self.augmentation.flip))
        chunk = self.batch_size * AUGMENT_CHUNK
        for index in (order[start:start + chunk] for start in range(0, len(order), chunk)):  # none when all skipped
            inputs = self.crop_flip_normalize(index, top[index], left[index], flip[index])
            yield from zip(inputs.split(self.batch_size), self.labels[index].split(self.batch_size), strict=True)

    def crop_flip_normalize(self, index: Tensor, top: Tensor, left: Tensor, flip: Tensor) -> Tensor:
        rows = (top[:, None] + self.window)[:, None, :, None]  # (B, 1, 32, 1)
        cols = left[:, None] + self.window
        cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]  # a flip reads columns backwards
        crops = self.padded[index[:, None, None, None], self.channels, rows, cols]  # (B, 3, 32, 32) uint8
        return self.normalize(crops).contiguous(memory_format=self.memory_format)


class EvalBatches:
    """This rank's share of the test set on the device, without padding: over all ranks every image once."""

    def __init__(self, images: ImageSet, rank: int, world_size: int, device: torch.device,
                 channels_last: bool = False, batch_size: int | None = None) -> None:
        shard = slice(rank, None, world_size)
        pixels = torch.from_numpy(images.test_images[shard]).to(device).permute(0, 3, 1, 2)
        self.inputs = Normalize(device)(pixels).contiguous(memory_format=memory_format(channels_last))
        self.targets = torch.from_numpy(images.test_labels[shard]).to(device)
        self.batch_size = batch_size or EVAL_BATCH_SIZE.get(device.type, EVAL_BATCH_SIZE["cpu"])

    def __len__(self) -> int:
        return len(self.targets)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self.targets), self.batch_size):
            yield self.inputs[start:start + self.batch_size], self.targets[start:start + self.batch_size]


def make_train_batches(images: ImageSet, plan: BatchPlan, device: torch.device, loader: str = "device",
                       channels_last: bool = False, workers: int = 2) -> TrainBatches:
    """`loader` is "device" (device-resident, augmented in batches) or "torch" (DataLoader + torchvision)."""
    if loader == "torch":
        return TorchTrainBatches(images, plan, device, channels_last, workers)
    return DeviceTrainBatches(images, plan, device, channels_last)
