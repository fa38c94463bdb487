"""Every speed setting trains a step on the CPU; per-device defaults; clear refusals."""

import itertools

import pytest
import torch
from tqdm import tqdm

from hpml import data
from hpml.config import TrainConfig
from hpml.training import dist, speed
from hpml.training.loop import Trainer

IMAGES = data.synthetic_cifar10(40, 10)  # four steps: enough for fp16's gradient scaler to find a scale that steps
WORLD = dist.single_process("cpu")


def train_steps(model: str = "shufflenetv2", images: data.ImageSet = IMAGES, **settings) -> dict:
    """Steps of 10 images; shufflenetv2 is the fastest model where bf16 and fp16 are emulated (no native bf16)."""
    cfg = TrainConfig(models=[model], batch_size=10, workers=0, device="cpu", **settings).validate()
    trainer = Trainer(cfg, model, WORLD, images)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    stats = trainer.train_epoch(1, tqdm(disable=True))
    assert stats["images"] == len(images.train_labels) and torch.isfinite(torch.tensor(stats["loss_sum"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    assert trainer.evaluate()["images"] == 10
    return trainer.speed.as_dict()


# Every pair of two settings' values trains in the default run; the rest of the product under -m slow (fp16 steps
# are emulated on a CPU, and the slowest of all).
PAIRWISE = {("device", "fp32", False), ("torch", "fp32", True), ("device", "bf16", True), ("torch", "bf16", False),
            ("device", "fp16", False), ("torch", "fp16", True)}
SETTINGS = [pytest.param(*setting, marks=() if setting in PAIRWISE else pytest.mark.slow)
            for setting in itertools.product(["device", "torch"], ["fp32", "bf16", "fp16"], [False, True])]


@pytest.mark.parametrize("loader, precision, channels_last", SETTINGS)
def test_every_setting_trains_a_step(loader, precision, channels_last):
    if precision == "fp16" and not hasattr(torch.amp, "GradScaler"):  # torch < 2.3 (SMDDP containers have 2.2)
        with pytest.raises(speed.UsageError, match="--precision fp16 on the CPU needs torch >= 2.3"):
            train_steps(loader=loader, precision=precision, channels_last=channels_last)
        return
    settings = train_steps(loader=loader, precision=precision, channels_last=channels_last)
    assert settings == {"loader": loader, "precision": precision, "channels_last": channels_last, "compile": False,
                        "cuda_graphs": False}


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp32", marks=pytest.mark.slow)])
def test_compile_trains_a_step(precision):
    # resnet18: the quickest of the models to compile
    assert train_steps("resnet18", data.synthetic_cifar10(20, 10), compile=True, precision=precision)["compile"] is True


def test_auto_precision_follows_the_cpu():
    settings = speed.resolve(TrainConfig(), torch.device("cpu"))
    assert settings.precision == ("bf16" if speed.cpu_has_native_bf16() else "fp32")
    assert settings.channels_last is True and settings.loader == "device" and settings.compile is False
    assert settings.cuda_graphs is False


@pytest.mark.parametrize("capability, precision", [
    ((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((7, 0), "fp16"), ((6, 1), "fp32")])
def test_auto_precision_never_emulates_on_a_gpu(capability, precision, monkeypatch):
    """bf16 where the GPU computes it (8.0+), fp16 on the older tensor cores (V100 7.0, T4 7.5), else fp32: not
    torch.cuda.is_bf16_supported(), which is true on a V100 too (emulated bf16)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    settings = speed.resolve(TrainConfig(), torch.device("cuda", 0))
    assert settings.precision == precision
    assert (speed.grad_scaler(settings, torch.device("cpu")) is not None) == (precision == "fp16")


def test_cuda_graphs_default_on_for_one_gpu_and_off_under_ddp(monkeypatch):
    """A graphed backward is one autograd node: DDP could send no gradient bucket before it ended."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    gpu = torch.device("cuda", 0)
    assert speed.resolve(TrainConfig(), gpu).cuda_graphs is True
    assert speed.resolve(TrainConfig(), gpu, world_size=2).cuda_graphs is False
    assert speed.resolve(TrainConfig(cuda_graphs=True), gpu, world_size=2).cuda_graphs is True


def test_cuda_graphs_are_refused_off_cuda_and_with_compile():
    with pytest.raises(speed.UsageError, match="--cuda-graphs needs a CUDA device, got cpu"):
        speed.resolve(TrainConfig(cuda_graphs=True), torch.device("cpu"))
    with pytest.raises(speed.UsageError, match="--cuda-graphs and --compile cannot be combined"):
        speed.resolve(TrainConfig(cuda_graphs=True, compile=True, precision="bf16"), torch.device("cuda"))


def test_compile_without_a_compiler_is_refused(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(speed.UsageError, match="--compile on the CPU needs a C\\+\\+ compiler"):
        speed.resolve(TrainConfig(compile=True), torch.device("cpu"))
