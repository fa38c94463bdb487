"""THE training loop: every script that trains (single device or data-parallel) calls fit()."""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import models

from . import results
from .config import TrainConfig
from .data import ImageSet, TestBatches, TrainBatches
from .dist import World


def seed_all(*seed_parts: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from one or more integers."""
    seed = int(np.random.SeedSequence(list(seed_parts)).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that a clock read afterwards measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wrap_for_world(model: nn.Module, world: World) -> nn.Module:
    """DistributedDataParallel in a process group (gradients averaged over ranks), else the model itself."""
    if not world.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)


def make_optimizer(cfg: TrainConfig, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.Adadelta(params, lr=lr)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch: cosine decay to zero over the run, or a constant rate."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: TrainBatches,
                    device: torch.device, progress: tqdm) -> dict:
    """One pass over this rank's shard. Returns sums (loss, correct, images) and times in seconds.

    data_time_s is the time the loop waited for the next batch; the epoch time is read after the
    device has finished the last step.
    """
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    images, data_time = 0, 0.0
    synchronize(device)
    start = time.perf_counter()
    batch_iter = iter(batches)
    while True:
        wait_start = time.perf_counter()
        batch = next(batch_iter, None)
        data_time += time.perf_counter() - wait_start
        if batch is None:
            break
        inputs, targets = batch
        outputs = model(inputs)
        loss = F.cross_entropy(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(targets)
        correct += (outputs.argmax(1) == targets).sum()
        images += len(targets)
        progress.update(1)
        if not progress.disable and progress.n % 20 == 0:
            progress.set_postfix(loss=f"{loss_sum.item() / images:.3f}", acc=f"{correct.item() / images:.3f}")
    synchronize(device)
    epoch_time = time.perf_counter() - start
    return {"loss_sum": loss_sum.item(), "correct": correct.item(), "images": images,
            "epoch_time_s": epoch_time, "data_time_s": data_time}


@torch.no_grad()
def evaluate(model: nn.Module, batches: TestBatches) -> dict:
    """Sums of loss and correct predictions over this rank's share of the test set."""
    model.eval()
    loss_sum, correct, images = 0.0, 0, 0
    for inputs, targets in batches:
        outputs = model(inputs)
        loss_sum += F.cross_entropy(outputs, targets, reduction="sum").item()
        correct += int((outputs.argmax(1) == targets).sum())
        images += len(targets)
    return {"loss_sum": loss_sum, "correct": correct, "images": images}


def fit(cfg: TrainConfig, model_name: str, world: World, images: ImageSet,
        log: Callable[[str], None] = print) -> dict:
    """Train `model_name` for cfg.epochs in `world`, evaluating every epoch; return the results record."""
    wall_start = time.perf_counter()
    device = world.device
    started_at = results.utc_now()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    seed_all(cfg.seed)
    model = models.build(model_name).to(device)
    params = sum(p.numel() for p in model.parameters())
    train_model = wrap_for_world(model, world)
    lr = cfg.lr * world.size if cfg.scale_lr else cfg.lr
    optimizer = make_optimizer(cfg, train_model.parameters(), lr)
    scheduler = make_scheduler(cfg, optimizer)
    train_batches = TrainBatches(images, cfg, world.rank, world.size, device)
    test_batches = TestBatches(images, cfg.batch_size, world.rank, world.size, device)
    show_progress = world.is_main and not cfg.quiet and sys.stderr.isatty()

    epochs: list[dict] = []
    for epoch in range(1, cfg.epochs + 1):
        seed_all(cfg.seed, epoch, world.rank)
        train_batches.set_epoch(epoch)
        epoch_lr = optimizer.param_groups[0]["lr"]
        with tqdm(total=len(train_batches), desc=f"{model_name} {epoch}/{cfg.epochs}", unit="batch",
                  leave=False, disable=not show_progress, dynamic_ncols=True) as progress:
            train = train_one_epoch(train_model, optimizer, train_batches, device, progress)
        scheduler.step()
        eval_start = time.perf_counter()
        test = evaluate(model, test_batches)
        eval_time = time.perf_counter() - eval_start
        epochs.append(epoch_metrics(epoch, epoch_lr, train, test, eval_time, world))
        if not cfg.quiet and world.is_main:
            log(format_epoch(model_name, cfg.epochs, epochs[-1]))

    record = {
        "schema_version": results.SCHEMA_VERSION,
        "run_id": results.new_run_id(model_name, "distributed" if world.distributed else "single", world.size),
        "model": model_name,
        "mode": "distributed" if world.distributed else "single",
        "backend": world.backend,
        "world_size": world.size,
        "nodes": world.nodes,
        "launcher": world.launcher,
        "batch_size": cfg.batch_size,
        "global_batch_size": cfg.batch_size * world.size,
        "lr": lr,
        "device": device.type,
        "started_at": started_at,
        "finished_at": results.utc_now(),
        "config": cfg.as_dict(),
        "data": images.summary(),
        "environment": results.environment(device),
        "params": params,
        "epochs": epochs,
        **results.summarize_epochs(epochs),
        "total_wall_time_s": time.perf_counter() - wall_start,
    }
    if world.sagemaker:
        record["sagemaker"] = world.sagemaker
    return record


def epoch_metrics(epoch: int, lr: float, train: dict, test: dict, eval_time: float, world: World) -> dict:
    """One epoch's metrics over all ranks: counts summed, times of the slowest rank."""
    loss_sum, correct, images, test_loss, test_correct, test_images = world.all_reduce([
        train["loss_sum"], train["correct"], train["images"], test["loss_sum"], test["correct"], test["images"],
    ])
    epoch_time, data_time, eval_time = world.all_reduce([train["epoch_time_s"], train["data_time_s"], eval_time],
                                                        op="max")
    return {
        "epoch": epoch,
        "lr": lr,
        "train_loss": loss_sum / images,
        "train_acc": correct / images,
        "test_loss": test_loss / test_images,
        "test_acc": test_correct / test_images,
        "epoch_time_s": epoch_time,
        "data_time_s": data_time,
        "compute_time_s": max(epoch_time - data_time, 0.0),
        "eval_time_s": eval_time,
        "images_per_s": images / epoch_time,
        "train_images": int(images),
        "test_images": int(test_images),
    }


def format_epoch(model_name: str, total_epochs: int, m: dict) -> str:
    return (f"{model_name} epoch {m['epoch']}/{total_epochs}: train loss {m['train_loss']:.4f} "
            f"acc {m['train_acc']:.4f} | test loss {m['test_loss']:.4f} acc {m['test_acc']:.4f} | "
            f"{m['epoch_time_s']:.1f}s ({m['data_time_s']:.1f}s data) {m['images_per_s']:.0f} img/s")
