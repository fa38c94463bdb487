import numpy as np
import pytest
import torch

from hpml import data
from hpml.training import speed
from hpml.training.speed import Augmentation, BatchPlan, EvalBatches, make_train_batches

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images() -> data.ImageSet:
    return data.synthetic_cifar10(300, 50)


def test_torch_loader_batches_are_normalised_crops(images):
    batches = make_train_batches(images, BatchPlan(64), CPU, "torch", workers=0)
    batches.set_epoch(1)
    shapes = [(x.shape, y.shape) for x, y in batches]
    assert len(shapes) == len(batches) == 5
    assert shapes[0] == (torch.Size([64, 3, 32, 32]), torch.Size([64])) and shapes[-1][1] == torch.Size([44])
    x, _ = next(iter(batches))
    assert x.dtype == torch.float32 and -3 < x.mean() < 3


@pytest.mark.parametrize("channels_last", [False, True])
def test_device_loader_gives_exactly_the_classic_pipelines_images(images, channels_last):
    classic = make_train_batches(images, BatchPlan(32, 7, 1, 2), CPU, "torch", channels_last, workers=2)
    device = make_train_batches(images, BatchPlan(32, 7, 1, 2), CPU, "device", channels_last)
    for epoch in (1, 2):
        classic.set_epoch(epoch)
        device.set_epoch(epoch)
        pairs = list(zip(classic, device, strict=True))
        assert len(pairs) == len(classic) == len(device) == 5
        for (x_classic, y_classic), (x_device, y_device) in pairs:
            assert torch.equal(y_classic, y_device)
            torch.testing.assert_close(x_device, x_classic, rtol=0, atol=1e-6)
            assert x_device.is_contiguous(memory_format=speed.memory_format(channels_last))


def test_crop_and_flip_follow_the_drawn_offsets(images):
    """Check one device-loader image against a pad/crop/flip done by hand in NumPy."""
    batches = make_train_batches(images, BatchPlan(300, 3), CPU, "device")
    batches.set_epoch(5)
    order = list(batches.sampler)
    (x, _), = list(batches)
    aug = batches.augmentation
    for position in (0, 1, 2, 150):
        index = order[position]
        padded = np.pad(images.train_images[index], ((4, 4), (4, 4), (0, 0)))
        expected = padded[aug.top[index]:aug.top[index] + 32, aug.left[index]:aug.left[index] + 32]
        if aug.flip[index]:
            expected = expected[:, ::-1]
        expected = speed.Normalize(CPU)(torch.from_numpy(expected.copy()).permute(2, 0, 1)[None])[0]
        torch.testing.assert_close(x[position], expected, rtol=0, atol=1e-6)


def test_augmentation_distribution_matches_torchvision_random_crop_and_flip():
    """RandomCrop(32, padding=4) picks each of the 9 offsets per axis uniformly; the flip has p = 0.5."""
    aug = Augmentation.draw(seed=0, epoch=1, size=90_000)
    for offsets in (aug.top, aug.left):
        counts = np.bincount(offsets, minlength=9)
        assert len(counts) == 9 and counts.min() > 9_500 and counts.max() < 10_500
    assert abs(aug.flip.mean() - 0.5) < 0.01
    assert not np.array_equal(aug.top, Augmentation.draw(seed=0, epoch=2, size=90_000).top)


def test_train_shards_are_disjoint_and_cover_the_set(images):
    seen = []
    for rank in range(2):
        batches = make_train_batches(images, BatchPlan(50, 0, rank, 2), CPU, "device")
        batches.set_epoch(3)
        seen.append(torch.cat([y for _, y in batches]).numel())
        seen.append(set(batches.sampler))
    assert seen[0] + seen[2] == 300 and not seen[1] & seen[3]


@pytest.mark.parametrize("loader", ["device", "torch"])
def test_drop_last_leaves_out_a_different_partial_batch_each_epoch(images, loader):
    kept = {}
    for epoch in (1, 2):
        batches = make_train_batches(images, BatchPlan(64, drop_last=True), CPU, loader, workers=0)
        batches.set_epoch(epoch)
        labels = [y for _, y in batches]
        assert len(batches) == len(labels) == 4 and all(len(y) == 64 for y in labels)  # 300 = 4 x 64 + 44
        kept[epoch] = set(batches.epoch_order())
    assert len(kept[1]) == 256 and kept[1] != kept[2]
    batches = make_train_batches(images, BatchPlan(64, drop_last=False), CPU, loader, workers=0)
    batches.set_epoch(1)
    assert [len(y) for _, y in batches] == [64, 64, 64, 64, 44]


def test_test_batches_cover_every_image_once_over_ranks(images):
    counts = [len(EvalBatches(images, rank, 3, CPU, batch_size=8)) for rank in range(3)]  # 50 images over 3 ranks
    assert counts == [17, 17, 16]


@pytest.mark.parametrize("loader", ["device", "torch"])
def test_an_epoch_resumed_after_its_last_step_has_no_batches_left(images, loader):
    batches = make_train_batches(images, BatchPlan(64, drop_last=True), CPU, loader, workers=0)
    batches.set_epoch(1, skip_batches=4)  # 300 images: 4 full batches, all taken before the stop
    assert len(batches) == 0 and list(batches) == []
