"""THE training loop: every script that trains (single device or data-parallel) calls fit()."""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import models

from . import results, speed
from .config import TrainConfig
from .data import ImageSet
from .dist import World
from .loaders import EvalBatches, make_train_batches


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


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[tuple[Tensor, Tensor]],
                    device: torch.device, progress: tqdm,
                    autocast: contextlib.AbstractContextManager | None = None,
                    scaler: torch.cuda.amp.GradScaler | None = None) -> dict:
    """One pass over this rank's shard. Returns sums (loss, correct, images) and times in seconds.

    data_time_s is the time the loop waited for the next batch; the epoch time is read after the
    device has finished the last step.
    """
    model.train()
    autocast = autocast or contextlib.nullcontext()
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
        with autocast:
            outputs = model(inputs)
            loss = F.cross_entropy(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
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
def evaluate(model: nn.Module, batches: EvalBatches, autocast: contextlib.AbstractContextManager | None = None) -> dict:
    """Sums of loss and correct predictions over this rank's share of the test set."""
    model.eval()
    loss_sum, correct, images = 0.0, 0, 0
    for inputs, targets in batches:
        with autocast or contextlib.nullcontext():
            outputs = model(inputs)
        loss_sum += F.cross_entropy(outputs.float(), targets, reduction="sum").item()
        correct += int((outputs.argmax(1) == targets).sum())
        images += len(targets)
    return {"loss_sum": loss_sum, "correct": correct, "images": images}


class Trainer:
    """One model set up to train in a world: weights, optimizer, schedule, batches and speed settings."""

    def __init__(self, cfg: TrainConfig, model_name: str, world: World, images: ImageSet) -> None:
        self.cfg, self.model_name, self.world = cfg, model_name, world
        device = world.device
        self.speed = speed.resolve(cfg, device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        seed_all(cfg.seed)
        self.model = speed.prepare_model(models.build(model_name).to(device), self.speed)
        self.params = sum(p.numel() for p in self.model.parameters())
        train_model = wrap_for_world(self.model, world)
        self.train_model = torch.compile(train_model) if self.speed.compile else train_model
        self.lr = cfg.lr * world.size if cfg.scale_lr else cfg.lr
        self.optimizer = make_optimizer(cfg, self.model.parameters(), self.lr)
        self.scheduler = make_scheduler(cfg, self.optimizer)
        self.scaler = speed.grad_scaler(self.speed, device)
        self.train_batches = make_train_batches(images, self.speed.loader, cfg.batch_size, cfg.seed, world.rank,
                                                world.size, device, self.speed.channels_last, cfg.workers)
        self.test_batches = EvalBatches(images, cfg.batch_size, world.rank, world.size, device,
                                        self.speed.channels_last)

    @property
    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_epoch(self, epoch: int, progress: tqdm) -> dict:
        seed_all(self.cfg.seed, epoch, self.world.rank)
        self.train_batches.set_epoch(epoch)
        stats = train_one_epoch(self.train_model, self.optimizer, self.train_batches, self.world.device, progress,
                                speed.autocast(self.speed, self.world.device), self.scaler)
        self.scheduler.step()
        return stats

    def evaluate(self) -> dict:
        return evaluate(self.model, self.test_batches, speed.autocast(self.speed, self.world.device))


def fit(cfg: TrainConfig, model_name: str, world: World, images: ImageSet,
        log: Callable[[str], None] = print) -> dict:
    """Train `model_name` for cfg.epochs in `world`, evaluating every epoch; return the results record."""
    wall_start = time.perf_counter()
    started_at = results.utc_now()
    trainer = Trainer(cfg, model_name, world, images)
    show_progress = world.is_main and not cfg.quiet and sys.stderr.isatty()
    epochs: list[dict] = []
    for epoch in range(1, cfg.epochs + 1):
        epoch_lr = trainer.current_lr
        with tqdm(total=len(trainer.train_batches), desc=f"{model_name} {epoch}/{cfg.epochs}", unit="batch",
                  leave=False, disable=not show_progress, dynamic_ncols=True) as progress:
            train = trainer.train_epoch(epoch, progress)
        eval_start = time.perf_counter()
        test = trainer.evaluate()
        eval_time = time.perf_counter() - eval_start
        epochs.append(epoch_metrics(epoch, epoch_lr, train, test, eval_time, world))
        if not cfg.quiet and world.is_main:
            log(format_epoch(model_name, cfg.epochs, epochs[-1]))

    mode = "distributed" if world.distributed else "single"
    record = {
        "schema_version": results.SCHEMA_VERSION,
        "run_id": results.new_run_id(model_name, mode, world.size),
        "model": model_name,
        "mode": mode,
        "backend": world.backend,
        "world_size": world.size,
        "nodes": world.nodes,
        "launcher": world.launcher,
        "batch_size": cfg.batch_size,
        "global_batch_size": cfg.batch_size * world.size,
        "lr": trainer.lr,
        "device": world.device.type,
        "speed": trainer.speed.as_dict(),
        "started_at": started_at,
        "finished_at": results.utc_now(),
        "config": cfg.as_dict(),
        "data": images.summary(),
        "environment": results.environment(world.device),
        "params": trainer.params,
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
