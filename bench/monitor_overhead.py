#!/usr/bin/env python3
"""How much does hpml.monitor.Monitor slow training? Times the suite's training loop with and without it.

A trial is one epoch of --steps steps of hpml.training.loop (the fast defaults of this device) on synthetic CIFAR-shaped
data. Trials without the monitor and with it at each interval are interleaved (the order rotates every repeat) so a
machine that speeds up or slows down affects all alike; the ratio is the median over repeats of
(seconds per step with the monitor) / (seconds per step without). Also printed: what one sample costs and what
starting and stopping the monitor costs. Process CPU time (every thread, the monitor's included) is reported
beside wall time: on a shared machine it is the steadier of the two.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hpml.errors import UsageError, one_line_on_ctrl_c

one_line_on_ctrl_c()  # before torch loads

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from hpml import cli, data, monitor  # noqa: E402
from hpml.config import (  # noqa: E402
    DEVICES,
    MAX_BATCH_SIZE,
    MAX_REPEATS,
    MAX_SAMPLE_INTERVAL,
    MAX_STEPS,
    MIN_SAMPLE_INTERVAL,
    TrainConfig,
    comma_list,
    parse_model_list,
)
from hpml.training import dist  # noqa: E402
from hpml.training.loop import Trainer  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description="Measure how much the background utilization monitor slows training.")
    parser.add_argument("--model", default="resnet18", help="model to train (default: %(default)s)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto (CUDA when available), cpu or cuda (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=8, help="training steps per timed trial (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="trials per condition; the median is reported (default: %(default)s)")
    parser.add_argument("--intervals", default="1.0,0.2",
                        help="comma list of monitor intervals in seconds to compare (default: %(default)s)")
    args = parser.parse_args(argv)
    cli.require_positive(args, "batch_size", "steps", "repeats")
    cli.require_at_most(args, batch_size=MAX_BATCH_SIZE, steps=MAX_STEPS, repeats=MAX_REPEATS)
    args.intervals = parse_intervals(args.intervals)
    names = parse_model_list(args.model)
    if len(names) != 1:
        raise UsageError(f"--model takes one model name, got {args.model!r}")
    args.model = names[0]
    return args


def parse_intervals(text: str) -> list[float]:
    """'1,0.2' -> [1.0, 0.2]; UsageError unless each is a number of seconds the monitor takes."""
    try:
        intervals = [float(part) for part in comma_list(text, "--intervals")]
    except ValueError:
        intervals = []
    if not intervals or not all(MIN_SAMPLE_INTERVAL <= interval <= MAX_SAMPLE_INTERVAL for interval in intervals):
        raise UsageError(f"--intervals must be a comma list of seconds from {MIN_SAMPLE_INTERVAL} to "
                         f"{MAX_SAMPLE_INTERVAL}, got {text!r}")
    return intervals


class TimedTraining:
    """The suite's Trainer, one epoch of `steps` steps per trial, timed by the training loop itself."""

    def __init__(self, model_name: str, device: str, batch_size: int, steps: int) -> None:
        self.world = dist.single_process(device)
        cfg = TrainConfig(models=[model_name], batch_size=batch_size, device=device, quiet=True).validate()
        self.trainer = Trainer(cfg, model_name, self.world, data.synthetic_cifar10(steps * batch_size, 10))
        self.epoch = 0

    def seconds_per_step(self) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) per step over one epoch."""
        self.epoch += 1
        cpu_started = time.process_time()
        stats = self.trainer.train_epoch(self.epoch, tqdm(disable=True))
        return stats["epoch_time_s"] / stats["steps"], (time.process_time() - cpu_started) / stats["steps"]


def sample_cost(device: torch.device, reads: int = 50) -> tuple[float, float, str]:
    """(seconds per sample, seconds to start and stop a Monitor, what is sampled)."""
    with monitor.Sampler(monitor.device_gpus(device)) as sampler:
        started = time.perf_counter()
        for _ in range(reads):
            sampler.read()
        per_read = (time.perf_counter() - started) / reads
        sampled = ", ".join(gpu.name for gpu in sampler.gpus) or f"CPU and RAM only ({sampler.nvml_error})"
    started = time.perf_counter()
    with monitor.Monitor(interval=60, gpu_indices=monitor.device_gpus(device)):
        pass
    return per_read, time.perf_counter() - started, sampled


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    training = TimedTraining(args.model, args.device, args.batch_size, args.steps)
    device = training.world.device
    training.seconds_per_step()  # warm-up: allocator, kernels, caches
    conditions: list[float | None] = [None, *args.intervals]
    times: dict[float | None, list[tuple[float, float]]] = {condition: [] for condition in conditions}
    samples: dict[float, int] = dict.fromkeys(args.intervals, 0)
    for repeat in range(args.repeats):
        for condition in conditions[repeat % len(conditions):] + conditions[:repeat % len(conditions)]:
            if condition is None:
                times[None].append(training.seconds_per_step())
                continue
            with monitor.Monitor(interval=condition, gpu_indices=monitor.device_gpus(device)) as sampling:
                times[condition].append(training.seconds_per_step())
            samples[condition] += len({row["timestamp"] for row in sampling.samples})
        print(f"repeat {repeat + 1}/{args.repeats}: "
              + ", ".join(f"{label(c)} {times[c][-1][0]:.4f} s/step" for c in conditions), file=sys.stderr, flush=True)
    per_read, start_stop, sampled = sample_cost(device)
    print(f"{args.model} on {device} ({torch.get_num_threads()} threads), batch {args.batch_size}, "
          f"{training.trainer.speed.precision}, {args.steps} steps per trial, {args.repeats} interleaved repeats; "
          f"sampling {sampled}")
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
