"""CIFAR-10 on disk (npz or torchvision's batches), a learnable synthetic stand-in, and subsets."""

from __future__ import annotations

import contextlib
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from hpml import files
from hpml.config import TrainConfig
from hpml.errors import UsageError, one_line

NUM_CLASSES = 10
CIFAR10_TRAIN_SIZE, CIFAR10_TEST_SIZE = 50_000, 10_000
# The two layouts of a CIFAR-10 folder: npz files, or torchvision's pickled batches (in BATCHES_FOLDER or the folder).
NPZ_FILES = ("train.npz", "test.npz")
NPZ_NOTES = "README.md"  # optional, beside the npz files: how they were made (a JPEG copy, say)
BATCHES_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
MIN_TEST_SUBSET = 1_000  # CIFAR-10: test accuracy within about +-1.5 points
# Synthetic data is not CIFAR-10 and its accuracy no study figure: a fifth of --subset, as CIFAR-10's proportion.
MIN_SYNTHETIC_TEST_SUBSET = 100
SUBSET_SEED = 0  # fixed, so runs with different --seed train on the same subset
SYNTHETIC_SEED = 1234
# The globals a pickled CIFAR-10 batch may name: numpy's array reconstruction (numpy 1 and 2 module names; _frombuffer
# for pickle protocol 5) and _codecs.encode, which protocols 0-2 use for bytes. Lists, dicts, bytes and numbers need
# none. A batch naming anything else (os.system, builtins.exec) is refused before it is called.
BATCH_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
})


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
            train_size, test_size = cfg.subset, _test_subset_size(cfg.subset, train_size, test_size,
                                                                  MIN_SYNTHETIC_TEST_SUBSET)
        return synthetic_cifar10(train_size, test_size)
    images = load_cifar10(Path(cfg.data_dir))
    return stratified_subset(images, cfg.subset) if cfg.subset else images


def load_cifar10(folder: Path) -> ImageSet:
    """CIFAR-10 from `folder` in the npz layout, torchvision's batches layout, or downloaded into it."""
    layout = cifar10_layout(folder)
    if layout is None:
        _download(folder)
        layout = ("npz", folder)
    kind, files_folder = layout
    return _load_npz(files_folder) if kind == "npz" else _load_batches(files_folder)


def cifar10_layout(folder: Path) -> tuple[str, Path] | None:
    """("npz", folder), ("batches", the folder holding the batches), or None when `folder` holds neither layout."""
    if any((folder / name).exists() for name in NPZ_FILES):
        return "npz", folder
    for batches in (folder / BATCHES_FOLDER, folder):
        if (batches / TRAIN_BATCHES[0]).exists():
            return "batches", batches
    return None


def cifar10_files(folder: Path) -> list[tuple[Path, str]] | None:
    """The files load_cifar10 reads from `folder`, each with its path in a folder of the usual layout (batches under
    BATCHES_FOLDER); None when `folder` holds neither layout. Imports no torch: the client uploads these files."""
    layout = cifar10_layout(folder)
    if layout is None:
        return None
    kind, files_folder = layout
    if kind == "npz":
        names = [*NPZ_FILES, *([NPZ_NOTES] if (files_folder / NPZ_NOTES).is_file() else [])]
        return [(files_folder / name, name) for name in names]
    return [(files_folder / name, f"{BATCHES_FOLDER}/{name}") for name in (*TRAIN_BATCHES, *TEST_BATCHES)]


def _load_npz(folder: Path) -> ImageSet:
    arrays = {}
    for split, name in zip(("train", "test"), NPZ_FILES, strict=True):
        path = folder / name
        if not path.exists():
            raise UsageError(f"{path} is missing: the npz layout needs both train.npz and test.npz")
        try:
            with files.open_regular(path) as file, np.load(file) as npz:
                arrays[split] = checked(npz["images"], npz["labels"], path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, MemoryError) as error:  # MemoryError: a
            # header claiming more images than memory holds
            raise UsageError(
                f"cannot read {path}: {one_line(error)} (expected arrays 'images' and 'labels')"
            ) from None
    readme = folder / NPZ_NOTES
    jpeg = readme.is_file() and "jpeg" in readme.read_text(errors="replace").lower()
    note = ", decoded from a JPEG copy: accuracies are close to, not identical with, published CIFAR-10 figures"
    return ImageSet(*arrays["train"], *arrays["test"], f"CIFAR-10 (npz{note if jpeg else ''})")


def _load_batches(folder: Path) -> ImageSet:
    def read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for name in names:
            path = folder / name
            try:
                batch_images, batch_labels = batch_arrays(load_batch(path))
                images.append(batch_images)
                labels.append(batch_labels)
            except FileNotFoundError:
                raise UsageError(f"{path} is missing: {BATCHES_FOLDER} needs data_batch_1..5 and test_batch") from None
            except Exception as error:  # a corrupt pickle can raise nearly anything
                raise UsageError(f"cannot read {path}: {one_line(error)}") from None
        return checked(np.concatenate(images), np.concatenate(labels), folder)

    train = read(list(TRAIN_BATCHES))
    test = read(list(TEST_BATCHES))
    return ImageSet(*train, *test, "CIFAR-10 (torchvision batches)")


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in BATCH_GLOBALS:
            raise pickle.UnpicklingError(f"refused: it asks for {module}.{name}, which no CIFAR-10 batch needs "
                                         "(allowed: numpy arrays, lists, dicts, bytes, numbers); nothing was run")
        return super().find_class(module, name)


def load_batch(path: Path) -> object:
    """One of torchvision's pickled batches, unpickled without calling anything but numpy's array reconstruction."""
    with files.open_regular(path) as file:
        return unpickle_batch(file)


def unpickle_batch(file: BinaryIO) -> object:
    """A pickled CIFAR-10 batch from an open file, unpickled without calling anything but numpy's array
    reconstruction."""
    return _BatchUnpickler(file, encoding="bytes").load()


def batch_arrays(batch: object) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 batch's images as uint8 (N, 32, 32, 3) HWC and its labels."""
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(batch[b"labels"])


def _download(folder: Path) -> None:
    """Download CIFAR-10 into the npz layout; a failed download leaves behind no folder it made."""
    from hpml.cifar10_download import download_cifar10  # it reads batches with this module

    made = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    try:
        download_cifar10(folder)
    except (UsageError, OSError) as error:
        for parent in made:  # deepest first; only folders the download left empty
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise UsageError(
            f"no CIFAR-10 in {folder} (looked for train.npz/test.npz and {BATCHES_FOLDER}/) and downloading it "
            f"failed ({one_line(error)}); copy the data there or point --data-dir / $HPML_CIFAR10 at it"
        ) from None


def checked(images: np.ndarray, labels: np.ndarray, source: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of a split from `source` (named in the errors), checked for shape and range."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise UsageError(f"{source}: images must be uint8 (N, 32, 32, 3), got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise UsageError(f"{source}: holds no images; each split needs at least one")
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
        raise UsageError(f"{source}: labels must be integers 0..{NUM_CLASSES - 1} of shape (N,), "
                         f"got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise UsageError(f"{source}: {len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):  # before the cast, which would wrap 2**63
        raise UsageError(f"{source}: labels must lie in 0..{NUM_CLASSES - 1}, got {labels.min()}..{labels.max()}")
    return images, labels.astype(np.int64)


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


def _test_subset_size(train_subset: int, train_size: int, test_size: int, floor: int = MIN_TEST_SUBSET) -> int:
    proportional = round(train_subset * test_size / train_size)
    return min(test_size, max(floor, proportional))


def _stratified_indices(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` indices spread over the classes as evenly as their counts allow, in a shuffled order."""
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(NUM_CLASSES)]
    quota = np.zeros(NUM_CLASSES, dtype=np.int64)
    for _ in range(size):  # round-robin over classes that still have images
        open_classes = [c for c in range(NUM_CLASSES) if quota[c] < len(by_class[c])]
        quota[min(open_classes, key=lambda c: quota[c])] += 1
    chosen = np.concatenate([members[:count] for members, count in zip(by_class, quota, strict=False)])
    return rng.permutation(chosen)
