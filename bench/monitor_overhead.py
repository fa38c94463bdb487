#!/usr/bin/env python3
"""How much does hpml.monitor.Monitor slow training? Times forward/backward steps with and without it.

Trials without the monitor and with it at each interval are interleaved (the order rotates every repeat) so a
machine that speeds up or slows down affects all alike; the ratio is the median over repeats of
(seconds per step with the monitor) / (seconds per step without). Also printed: what one sample costs and what
starting and stopping the monitor costs. Process CPU time (every thread, the monitor's included) is reported
beside wall time: on a shared machine it is the steadier of the two.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

import models
from hpml import cli, monitor
from hpml.errors import UsageError


def parse_args(argv: Sequence[str] | None):
    parser = cli.ArgumentParser(description="Measure how much the background utilization monitor slows training.")
    parser.add_argument("--model", default="resnet18", help="model to train (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto (CUDA when available), cpu or cuda (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=8, help="training steps per timed trial (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="trials per condition; the median is reported (default: %(default)s)")
    parser.add_argument("--intervals", default="1.0,0.2",
                        help="comma list of monitor intervals in seconds to compare (default: %(default)s)")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "steps", "repeats"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    try:
        args.intervals = [float(part) for part in args.intervals.split(",")]
    except ValueError:
        raise UsageError(f"--intervals must be a comma list of seconds, got {args.intervals!r}") from None
    if not all(0 < interval < float("inf") for interval in args.intervals):
        raise UsageError(f"--intervals must be positive numbers of seconds, got {args.intervals}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return args


class Trainer:
    """Repeated training steps on one fixed random batch: the compute of training, without the data loading."""

    def __init__(self, model_name: str, device: torch.device, batch_size: int):
        self.device = device
        self.model = models.build(model_name).to(device).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.images = torch.randn(batch_size, 3, 32, 32, device=device)
        self.labels = torch.randint(0, 10, (batch_size,), device=device)
        self.loss = nn.CrossEntropyLoss()

    def seconds_per_step(self, steps: int) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) per step."""
        self.sync()
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.optimizer.zero_grad(set_to_none=True)
            self.loss(self.model(self.images), self.labels).backward()
            self.optimizer.step()
        self.sync()
        return (time.perf_counter() - started) / steps, (time.process_time() - cpu_started) / steps

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def gpu_indices(device: torch.device) -> list[int] | None:
    """Sample only the GPU being trained on, as each rank of a training run does."""
    return [device.index or 0] if device.type == "cuda" else None


def sample_cost(device: torch.device, reads: int = 50) -> tuple[float, float, str]:
    """(seconds per sample, seconds to start and stop a Monitor, what is sampled)."""
    with monitor.Sampler(gpu_indices(device)) as sampler:
        started = time.perf_counter()
        for _ in range(reads):
            sampler.read()
        per_read = (time.perf_counter() - started) / reads
        sampled = ", ".join(gpu.name for gpu in sampler.gpus) or f"CPU and RAM only ({sampler.nvml_error})"
    started = time.perf_counter()
    with monitor.Monitor(interval=60, gpu_indices=gpu_indices(device)):
        pass
    return per_read, time.perf_counter() - started, sampled


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    trainer = Trainer(args.model, device, args.batch_size)
    trainer.seconds_per_step(2)  # warm-up: allocator, kernels, caches
    conditions: list[float | None] = [None, *args.intervals]
    times: dict[float | None, list[tuple[float, float]]] = {condition: [] for condition in conditions}
    samples: dict[float, int] = dict.fromkeys(args.intervals, 0)
    for repeat in range(args.repeats):
        for condition in conditions[repeat % len(conditions):] + conditions[:repeat % len(conditions)]:
            if condition is None:
                times[None].append(trainer.seconds_per_step(args.steps))
                continue
            with monitor.Monitor(interval=condition, gpu_indices=gpu_indices(device)) as sampling:
                times[condition].append(trainer.seconds_per_step(args.steps))
            samples[condition] += len({row["timestamp"] for row in sampling.samples})
        print(f"repeat {repeat + 1}/{args.repeats}: "
              + ", ".join(f"{label(c)} {times[c][-1][0]:.4f} s/step" for c in conditions), file=sys.stderr, flush=True)
    per_read, start_stop, sampled = sample_cost(device)
    print(f"{args.model} on {device} ({torch.get_num_threads()} threads), batch {args.batch_size}, "
          f"{args.steps} steps per trial, {args.repeats} interleaved repeats; sampling {sampled}")
    for kind, which in (("wall", 0), ("process CPU", 1)):
        print(f"{kind} time without monitor: {statistics.median(t[which] for t in times[None]):.4f} s/step (median)")
        for interval in args.intervals:
            ratios = [on[which] / off[which] for on, off in zip(times[interval], times[None], strict=True)]
            print(f"  monitor every {interval:>4g} s: {statistics.median(t[which] for t in times[interval]):.4f} "
                  f"s/step, ratio {statistics.median(ratios):.3f} (median of paired trials; min {min(ratios):.3f}, "
                  f"max {max(ratios):.3f})")
    print("samples taken: " + ", ".join(f"{samples[i]} at {i:g} s" for i in args.intervals))
    print(f"one sample costs {per_read * 1e3:.2f} ms of the sampling thread; starting and stopping the monitor "
          f"{start_stop * 1e3:.1f} ms")
    return 0


def label(condition: float | None) -> str:
    return "off" if condition is None else f"every {condition:g} s"


if __name__ == "__main__":
    cli.run_script(main)
