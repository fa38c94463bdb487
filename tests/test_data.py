import pickle

import numpy as np
import pytest

from hpml import cifar10_download, data
from hpml.config import TrainConfig
from hpml.errors import UsageError


def test_npz_layout(npz_dir):
    images = data.load_cifar10(npz_dir)
    assert images.train_images.shape == (200, 32, 32, 3) and images.train_images.dtype == np.uint8
    assert images.test_labels.shape == (50,) and images.test_labels.dtype == np.int64
    assert "npz" in images.description and "JPEG" not in images.description


def test_npz_with_jpeg_readme_says_so(npz_dir):
    (npz_dir / "README.md").write_text("decoded from a public copy stored as JPEG files")
    assert "JPEG" in data.load_cifar10(npz_dir).description


def test_batches_layout_from_parent_or_the_folder_itself(batches_dir):
    for folder in (batches_dir, batches_dir / data.BATCHES_FOLDER):
        images = data.load_cifar10(folder)
        assert images.train_images.shape == (100, 32, 32, 3)
        assert images.test_images.shape == (30, 32, 32, 3)
        assert images.train_labels.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_cifar10_files_lists_what_load_cifar10_reads_in_the_usual_layout(npz_dir, batches_dir, tmp_path):
    assert [key for _, key in data.cifar10_files(npz_dir)] == ["train.npz", "test.npz"]
    (npz_dir / "README.md").write_text("notes on the copy")
    assert [key for _, key in data.cifar10_files(npz_dir)] == ["train.npz", "test.npz", "README.md"]
    batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for folder in (batches_dir, batches_dir / data.BATCHES_FOLDER):
        found = data.cifar10_files(folder)
        assert [key for _, key in found] == [f"{data.BATCHES_FOLDER}/{name}" for name in batches]
        assert [path for path, _ in found] == [batches_dir / data.BATCHES_FOLDER / name for name in batches]
    assert data.cifar10_files(tmp_path) is None


def test_batches_layout_decodes_channels_in_order(batches_dir):
    """The CHW row-major bytes of torchvision's batches must come back as the same HWC image."""
    with open(batches_dir / data.BATCHES_FOLDER / "data_batch_1", "rb") as file:
        raw = pickle.load(file, encoding="bytes")[b"data"][0]
    image = data.load_cifar10(batches_dir).train_images[0]
    assert image[0, 0, 0] == raw[0] and image[0, 0, 1] == raw[1024] and image[0, 1, 0] == raw[1]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_batches_pickled_with_any_protocol_or_numpy_version_load(batches_dir, protocol):
    """The batches' unpickler allows what numpy arrays, lists, dicts and bytes need under every pickle protocol, and
    numpy 1's module names (CIFAR-10's own batches were pickled by Python 2 and numpy 1, protocol 2)."""
    expected = data.load_cifar10(batches_dir)
    for path in (batches_dir / data.BATCHES_FOLDER).iterdir():
        pickled = pickle.dumps(data.load_batch(path), protocol=protocol)
        path.write_bytes(pickled.replace(b"numpy._core.", b"numpy.core.") if protocol == 2 else pickled)
    loaded = data.load_cifar10(batches_dir)
    assert np.array_equal(loaded.train_images, expected.train_images)
    assert np.array_equal(loaded.test_labels, expected.test_labels)


def test_corrupt_npz_names_the_file(npz_dir):
    (npz_dir / "train.npz").write_bytes(b"not a zip file")
    with pytest.raises(UsageError, match="train.npz"):
        data.load_cifar10(npz_dir)


def test_npz_with_wrong_shape_is_refused(npz_dir):
    np.savez(npz_dir / "test.npz", images=np.zeros((5, 28, 28), np.uint8), labels=np.zeros(5, np.uint8))
    with pytest.raises(UsageError, match=r"uint8 \(N, 32, 32, 3\)"):
        data.load_cifar10(npz_dir)


def test_missing_half_of_npz_layout(npz_dir):
    (npz_dir / "test.npz").unlink()
    with pytest.raises(UsageError, match="test.npz is missing"):
        data.load_cifar10(npz_dir)


def test_missing_data_and_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    # Point the download at a closed local port so the test never reaches the internet.
    monkeypatch.setattr(cifar10_download, "URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(UsageError, match="no CIFAR-10 in .*downloading it failed"):
        data.load_cifar10(tmp_path / "missing" / "cifar10")
    assert list(tmp_path.iterdir()) == []  # a bad --data-dir makes no folders


def test_synthetic_is_deterministic_and_balanced():
    first, second = data.synthetic_cifar10(300, 100), data.synthetic_cifar10(300, 100)
    assert np.array_equal(first.train_images, second.train_images)
    assert np.array_equal(first.test_labels, second.test_labels)
    assert np.bincount(first.train_labels).tolist() == [30] * 10
    assert not np.array_equal(first.train_images[:100], first.test_images)


def test_synthetic_classes_are_separable_by_mean_colour():
    """A nearest-class-mean classifier on raw pixels does far better than chance: the set is learnable."""
    images = data.synthetic_cifar10(2000, 500)
    x_train = images.train_images.reshape(len(images.train_images), -1).astype(np.float32)
    centroids = np.stack([x_train[images.train_labels == c].mean(0) for c in range(10)])
    x_test = images.test_images.reshape(len(images.test_images), -1).astype(np.float32)
    predicted = ((x_test[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == images.test_labels).mean() > 0.5


def test_stratified_subset_sizes(npz_dir):
    images = data.load_cifar10(npz_dir)
    subset = data.stratified_subset(images, 40)
    assert np.bincount(subset.train_labels, minlength=10).tolist() == [4] * 10
    # proportional test subset is 10, but at least 1,000 when available: here all 50
    assert len(subset.test_labels) == 50
    assert "stratified subset" in subset.description


def test_subset_test_size_is_proportional_with_a_floor():
    assert data._test_subset_size(512, 50_000, 10_000) == 1_000
    assert data._test_subset_size(10_000, 50_000, 10_000) == 2_000
    assert data._test_subset_size(50_000, 50_000, 10_000) == 10_000


def test_subset_larger_than_training_set(npz_dir):
    with pytest.raises(UsageError, match="--subset 500 is larger than the training set"):
        data.load_dataset(TrainConfig(data_dir=str(npz_dir), subset=500))


def test_synthetic_subset_sizes():
    images = data.load_dataset(TrainConfig(dataset="synthetic", subset=512))
    assert len(images.train_labels) == 512 and len(images.test_labels) == 102  # a fifth, as CIFAR-10's split
    assert len(data.load_dataset(TrainConfig(dataset="synthetic", subset=64)).test_labels) == 100
