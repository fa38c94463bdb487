"""Worker for test_distributed.py: a few SGD steps through hpml's sharding, augmentation, DDP and loop.

Run as a world of one with batch B, or under torchrun with 2 ranks and batch B/2 (once per communication option);
rank 0 saves the weights, and the last epoch's metrics (loop.epoch_metrics, with the test set evaluated) of the
plain all-reduce as JSON beside them.
The model has no batch norm, so a step over B images is the same computation whether one process or two
ranks (each over B/2, gradients averaged by DDP) take it; only float summation order differs.
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from hpml import data
from hpml.config import TrainConfig
from hpml.training import dist, loop, speed


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


# Each under torchrun, beside the plain all-reduce: the communication options of run_distributed.py.
COMMUNICATION = {
    "none": {},
    "fp16": {"grad_compression": "fp16"},
    "bf16": {"grad_compression": "bf16"},
    "powersgd": {"grad_compression": "powersgd"},
    "small buckets, static graph": {"bucket_cap_mb": 0.001, "static_graph": True},
}


def main(batch_size: int, out: str) -> None:
    """Train with every COMMUNICATION setting under torchrun (only "none" in a world of one); rank 0 saves
    {setting: weights} to `out`."""
    cfg = TrainConfig(dataset="synthetic", subset=64, batch_size=batch_size, workers=0, optimizer="sgd", lr=0.05,
                      device="cpu", backend="gloo").validate()
    world = dist.setup(cfg, log=lambda _: None)
    images = data.load_dataset(cfg)
    plan = speed.BatchPlan(cfg.batch_size, cfg.seed, world.rank, world.size)
    batches = speed.make_train_batches(images, plan, world.device, "torch")
    weights, metrics = {}, {}
    for name, options in COMMUNICATION.items() if dist.launcher_from_env() == "torchrun" else [("none", {})]:
        loop.seed_all(cfg.seed)
        model = small_cnn()
        ddp_model = loop.wrap_for_world(model, world, dataclasses.replace(cfg, **options))
        optimizer = loop.make_optimizer(cfg, ddp_model.parameters(), cfg.lr)
        for epoch in (1, 2):
            batches.set_epoch(epoch)
            stats = loop.train_steps(ddp_model, optimizer, batches, world.device, tqdm(disable=True))
        weights[name] = model.state_dict()
        if name == "none":
            test = loop.evaluate_batches(model, speed.EvalBatches(images, world.rank, world.size, world.device))
            metrics = loop.epoch_metrics(2, cfg.lr, stats, test, 0.0, world)
    if world.is_main:
        torch.save(weights, out)
        Path(out).with_suffix(".json").write_text(json.dumps(metrics))
    dist.teardown()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
