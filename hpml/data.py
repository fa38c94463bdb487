"""CIFAR-10 on disk (npz or torchvision's batches), a learnable synthetic stand-in, subsets, and batches."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms
from torchvision.transforms import functional as TF

from .config import TrainConfig
from .errors import UsageError

NUM_CLASSES = 10
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_TRAIN_SIZE, CIFAR10_TEST_SIZE = 50_000, 10_000
BATCHES_FOLDER = "cifar-10-batches-py"
MIN_TEST_SUBSET = 1_000
SUBSET_SEED = 0  # fixed, so runs with different --seed train on the same subset
SYNTHETIC_SEED = 1234


@dataclass
class ImageSet:
    """Train and test images, uint8 (N, 32, 32, 3) HWC RGB, with int64 labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    description: str

    def summary(self) -> dict:
        return {
            "description": self.description,
            "train_size": len(self.train_labels),
            "test_size": len(self.test_labels),
        }


def load_dataset(cfg: TrainConfig) -> ImageSet:
    """The configured data set, subset applied; UsageError when it is missing or malformed."""
    if cfg.dataset == "synthetic":
        train_size, test_size = CIFAR10_TRAIN_SIZE, CIFAR10_TEST_SIZE
        if cfg.subset:
            train_size, test_size = cfg.subset, _test_subset_size(cfg.subset, train_size, test_size)
        return synthetic_cifar10(train_size, test_size)
    images = load_cifar10(Path(cfg.data_dir))
    return stratified_subset(images, cfg.subset) if cfg.subset else images


def load_cifar10(folder: Path) -> ImageSet:
    """CIFAR-10 from `folder` in the npz layout, torchvision's batches layout, or downloaded into it."""
    if (folder / "train.npz").exists() or (folder / "test.npz").exists():
        return _load_npz(folder)
    for batches in (folder / BATCHES_FOLDER, folder):
        if (batches / "data_batch_1").exists():
            return _load_batches(batches)
    _download(folder)
    return _load_batches(folder / BATCHES_FOLDER)


def _load_npz(folder: Path) -> ImageSet:
    arrays = {}
    for split in ("train", "test"):
        path = folder / f"{split}.npz"
        if not path.exists():
            raise UsageError(f"{path} is missing: the npz layout needs both train.npz and test.npz")
        try:
            with np.load(path) as npz:
                arrays[split] = _checked(npz["images"], npz["labels"], path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise UsageError(
                f"cannot read {path}: {_one_line(error)} (expected arrays 'images' and 'labels')"
            ) from None
    readme = folder / "README.md"
    jpeg = readme.exists() and "jpeg" in readme.read_text(errors="replace").lower()
    note = ", decoded from a JPEG copy: accuracies are close to, not identical with, published CIFAR-10 figures"
    return ImageSet(*arrays["train"], *arrays["test"], f"CIFAR-10 (npz{note if jpeg else ''})")


def _load_batches(folder: Path) -> ImageSet:
    def read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for name in names:
            path = folder / name
            try:
                with open(path, "rb") as file:
                    batch = pickle.load(file, encoding="bytes")
                images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                labels.append(np.asarray(batch[b"labels"]))
            except FileNotFoundError:
                raise UsageError(f"{path} is missing: {BATCHES_FOLDER} needs data_batch_1..5 and test_batch") from None
            except Exception as error:  # a corrupt pickle can raise nearly anything
                raise UsageError(f"cannot read {path}: {_one_line(error)}") from None
        return _checked(np.concatenate(images), np.concatenate(labels), folder)

    train = read([f"data_batch_{i}" for i in range(1, 6)])
    test = read(["test_batch"])
    return ImageSet(*train, *test, "CIFAR-10 (torchvision batches)")


def _download(folder: Path) -> None:
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(str(folder), train=True, download=True)
    except Exception as error:
        raise UsageError(
            f"no CIFAR-10 in {folder} (looked for train.npz/test.npz and {BATCHES_FOLDER}/) and downloading it "
            f"failed ({_one_line(error)}); copy the data there or point --data-dir / $HPML_CIFAR10 at it"
        ) from None


def _checked(images: np.ndarray, labels: np.ndarray, source: Path) -> tuple[np.ndarray, np.ndarray]:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise UsageError(f"{source}: images must be uint8 (N, 32, 32, 3), got {images.dtype} {images.shape}")
    labels = labels.astype(np.int64).reshape(-1)
    if len(labels) != len(images):
        raise UsageError(f"{source}: {len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise UsageError(f"{source}: labels must lie in 0..{NUM_CLASSES - 1}, got {labels.min()}..{labels.max()}")
    return images, labels


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def synthetic_cifar10(train_size: int, test_size: int) -> ImageSet:
    """A deterministic, learnable CIFAR-shaped set: each class is a smooth colour pattern under noise.

    The patterns are coarse (8-pixel cells), so random crops and flips keep them recognisable and
    accuracy rises well above chance within a few epochs.
    """
    rng = np.random.default_rng(SYNTHETIC_SEED)
    coarse = rng.uniform(0.15, 0.85, size=(NUM_CLASSES, 4, 4, 3)).astype(np.float32)
    prototypes = coarse.repeat(8, axis=1).repeat(8, axis=2)

    def draw(size: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        split_rng = np.random.default_rng([SYNTHETIC_SEED, stream])
        labels = np.arange(size, dtype=np.int64) % NUM_CLASSES
        split_rng.shuffle(labels)
        images = np.empty((size, 32, 32, 3), dtype=np.uint8)
        for start in range(0, size, 4096):
            chunk = labels[start:start + 4096]
            brightness = split_rng.uniform(0.7, 1.3, size=(len(chunk), 1, 1, 1)).astype(np.float32)
            noise = split_rng.normal(0.0, 0.25, size=(len(chunk), 32, 32, 3)).astype(np.float32)
            pixels = prototypes[chunk] * brightness + noise
            images[start:start + len(chunk)] = np.clip(pixels * 255.0, 0, 255).astype(np.uint8)
        return images, labels

    return ImageSet(*draw(train_size, 0), *draw(test_size, 1), "synthetic CIFAR-shaped data (not CIFAR-10)")


def stratified_subset(images: ImageSet, train_size: int) -> ImageSet:
    """`train_size` training images, equally many per class, and a proportional test subset (>= 1,000)."""
    available = len(images.train_labels)
    if train_size > available:
        raise UsageError(f"--subset {train_size} is larger than the training set ({available} images)")
    test_size = _test_subset_size(train_size, available, len(images.test_labels))
    rng = np.random.default_rng(SUBSET_SEED)
    train = _stratified_indices(images.train_labels, train_size, rng)
    test = _stratified_indices(images.test_labels, test_size, rng)
    return ImageSet(
        images.train_images[train], images.train_labels[train],
        images.test_images[test], images.test_labels[test],
        images.description + ", class-stratified subset",
    )


def _test_subset_size(train_subset: int, train_size: int, test_size: int) -> int:
    proportional = round(train_subset * test_size / train_size)
    return min(test_size, max(MIN_TEST_SUBSET, proportional))


def _stratified_indices(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` indices spread over the classes as evenly as their counts allow, in a shuffled order."""
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(NUM_CLASSES)]
    quota = np.zeros(NUM_CLASSES, dtype=np.int64)
    for _ in range(size):  # round-robin over classes that still have images
        open_classes = [c for c in range(NUM_CLASSES) if quota[c] < len(by_class[c])]
        quota[min(open_classes, key=lambda c: quota[c])] += 1
    chosen = np.concatenate([members[:count] for members, count in zip(by_class, quota, strict=False)])
    return rng.permutation(chosen)


# ---- batches -------------------------------------------------------------------------------------

CROP_PADDING = 4


@dataclass
class Augmentation:
    """One epoch's random crop offsets (0..8, after padding by 4) and flips, one per training image.

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
        self.images, self.labels = images, labels
        self.augmentation: Augmentation | None = None
        self.to_normalized_tensor = transforms.Compose([transforms.ToTensor(), normalize_transform()])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        aug = self.augmentation
        image = TF.pad(Image.fromarray(self.images[index]), CROP_PADDING)
        image = TF.crop(image, int(aug.top[index]), int(aug.left[index]), 32, 32)
        if aug.flip[index]:
            image = TF.hflip(image)
        return self.to_normalized_tensor(image), int(self.labels[index])


def normalize_transform() -> transforms.Normalize:
    return transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)


def normalized_tensor(images: np.ndarray) -> Tensor:
    """uint8 NHWC images -> normalised float NCHW tensor."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return pixels.sub_(mean).div_(std)


class TrainBatches:
    """This rank's shard of the training set as augmented batches on the device, reshuffled per epoch.

    The shard and order come from DistributedSampler (seeded by --seed and the epoch), the crops and flips
    from Augmentation; a DataLoader runs torchvision's transforms in worker processes.
    """

    def __init__(self, images: ImageSet, cfg: TrainConfig, rank: int, world_size: int, device: torch.device) -> None:
        self.dataset = AugmentedImages(images.train_images, images.train_labels)
        self.sampler = DistributedSampler(self.dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                          seed=cfg.seed)
        self.loader = DataLoader(
            self.dataset, batch_size=cfg.batch_size, sampler=self.sampler, num_workers=cfg.workers,
            pin_memory=device.type == "cuda", drop_last=False,
        )
        self.seed, self.device = cfg.seed, device

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.augmentation = Augmentation.draw(self.seed, epoch, len(self.dataset))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for inputs, targets in self.loader:
            yield inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)


class TestBatches:
    """This rank's share of the test set, without padding: over all ranks every image is seen once."""

    def __init__(self, images: ImageSet, batch_size: int, rank: int, world_size: int, device: torch.device) -> None:
        shard = slice(rank, None, world_size)
        self.inputs = normalized_tensor(images.test_images[shard]).to(device)
        self.targets = torch.from_numpy(images.test_labels[shard]).to(device)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.targets)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self.targets), self.batch_size):
            yield self.inputs[start:start + self.batch_size], self.targets[start:start + self.batch_size]
