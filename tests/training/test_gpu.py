"""CUDA-only checks (pytest -m gpu on a GPU machine): the fast settings train like the plain ones there."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tqdm import tqdm

import models
from hpml import data
from hpml.config import TrainConfig
from hpml.training import dist, speed
from hpml.training.loop import Trainer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.filterwarnings(f"error:{speed.ACCUMULATE_GRAD_STREAM_WARNING}")]

IMAGES = data.synthetic_cifar10(600, 200)  # 600 = 4 batches of 128 and a partial one of 88


def train(epochs: int = 2, **settings) -> tuple[Trainer, list[dict]]:
    """Keeps the partial batch, which a graphed model runs eagerly."""
    cfg = TrainConfig(models=["resnet18"], batch_size=128, device="cuda", drop_last=False, **settings).validate()
    trainer = Trainer(cfg, "resnet18", dist.single_process("cuda"), IMAGES)
    return trainer, [trainer.train_epoch(epoch, tqdm(disable=True)) for epoch in range(1, epochs + 1)]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_graphed_step_computes_what_an_eager_step_does(precision):
    """Same weights, same batch: outputs, gradients and BatchNorm statistics after one step agree."""
    cuda = torch.device("cuda")
    settings = speed.SpeedSettings("device", precision, channels_last=True, compile=False, cuda_graphs=True)
    autocast = speed.autocast(settings, cuda)
    eager = speed.prepare_model(models.build("resnet18").to(cuda), settings).train()
    graphed_model = copy.deepcopy(eager)
    inputs = torch.randn(64, 3, 32, 32, device=cuda).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 10, (64,), device=cuda)
    tolerance = 1e-3 if precision == "fp32" else 3e-2
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        graphed = speed.GraphedModel(graphed_model, torch.randn_like(inputs), autocast)
        for batch in (inputs, inputs[:40]):  # a full batch replays the graph, a partial one runs eagerly
            results = []
            for model in (graphed, eager):
                model.zero_grad(set_to_none=True)
                with autocast:
                    outputs = model(batch)
                    loss = F.cross_entropy(outputs, targets[:len(batch)])
                loss.backward()
                results.append((outputs.detach().clone(), [p.grad.clone() for p in model.parameters()]))
            (graphed_out, graphed_grads), (eager_out, eager_grads) = results
            assert relative_error(graphed_out, eager_out) < tolerance
            for g, e in zip(graphed_grads, eager_grads, strict=True):
                assert relative_error(g, e) < tolerance
    for g, e in zip(graphed_model.buffers(), eager.buffers(), strict=True):  # capture left no trace in them
        assert relative_error(g, e) < tolerance if g.is_floating_point() else torch.equal(g, e)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_graphs_train_like_eager(precision):
    """Two epochs end close, not equal: the two models may run different cuDNN kernels, and training magnifies
    rounding differences (on an H100, fp32 graphed vs eager differed by 0.01 % in the first epoch's loss and
    0.2 % in the second's)."""
    graphed, graphed_stats = train(precision=precision, cuda_graphs=True)
    eager, eager_stats = train(precision=precision, cuda_graphs=False)
    assert graphed.speed.cuda_graphs and not eager.speed.cuda_graphs
    for g, e in zip(graphed_stats, eager_stats, strict=True):
        assert g["images"] == e["images"] == 600
        assert g["loss_sum"] == pytest.approx(e["loss_sum"], rel=2e-2)
    assert graphed.evaluate()["correct"] == pytest.approx(eager.evaluate()["correct"], abs=30)


def test_cuda_graphs_are_the_cuda_default_and_step_aside_for_compile():
    trainer, _ = train(epochs=1)
    assert trainer.speed.as_dict() == {"loader": "device", "precision": "bf16", "channels_last": True,
                                       "compile": False, "cuda_graphs": True}
    cfg = TrainConfig(models=["resnet18"], device="cuda", compile=True).validate()
    assert Trainer(cfg, "resnet18", dist.single_process("cuda"), IMAGES).speed.cuda_graphs is False


def test_every_model_trains_with_the_cuda_defaults():
    for name in ("vgg16", "mobilenetv2", "shufflenetv2", "densenet121"):
        cfg = TrainConfig(models=[name], batch_size=128, device="cuda").validate()
        trainer = Trainer(cfg, name, dist.single_process("cuda"), IMAGES)
        stats = trainer.train_epoch(1, tqdm(disable=True))
        assert stats["images"] == 512 and torch.isfinite(torch.tensor(stats["loss_sum"])), name  # partial dropped
