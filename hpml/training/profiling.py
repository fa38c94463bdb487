"""--profile: torch.profiler over a window of extra training steps after the last epoch, a trace per rank.

The window trains 1 + --profile-steps steps with the run's own loop, model, optimizer and batches (an epoch beyond
the last): the first warms the profiler up, the others are recorded. It runs after the timed epochs, their
evaluation and the final weights, so the profiler's slowdown enters no epoch time, images/s or accuracy. Each rank
writes <run_id>.rank<N>.trace.json beside the results; the record gets the mean step's breakdown over ranks
(hpml.training.trace_breakdown) under "profile".
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from hpml import files
from hpml.results import trace_name
from hpml.training import speed, trace_breakdown
from hpml.training.loop import Trainer, synchronize, train_steps
from hpml.training.speed import TrainBatches

PROFILER_WARMUP_STEPS = 1

def window_batches(batches: TrainBatches, first_epoch: int, steps: int) -> Iterator[tuple[Tensor, Tensor]]:
    """`steps` batches from epoch `first_epoch` on, each wait for one inside a DATA_SPAN."""
    epoch, taken = first_epoch, 0
    while True:
        batches.set_epoch(epoch)
        shard = iter(batches)
        while True:
            with torch.profiler.record_function(trace_breakdown.DATA_SPAN):
                batch = next(shard, None)
            if batch is None:
                break
            yield batch
            taken += 1
            if taken == steps:
                return
        epoch += 1


def activities(device: torch.device) -> list[torch.profiler.ProfilerActivity]:
    cuda = [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    return [torch.profiler.ProfilerActivity.CPU, *cuda]


def extra_steps(trainer: Trainer, first_epoch: int, steps: int, on_step: Callable[[], object]) -> None:
    """`steps` steps of the run's own loop, model, optimizer and batches (from epoch `first_epoch` on), `on_step`
    after each once the device has finished it."""
    device = trainer.world.device

    def step_done(*_: object) -> None:
        synchronize(device)
        on_step()

    batches = window_batches(trainer.train_batches, first_epoch, steps)
    train_steps(trainer.train_model, trainer.optimizer, batches, device, tqdm(disable=True),
                speed.autocast(trainer.speed, device), trainer.scaler, on_step=step_done)


def record_steps(trainer: Trainer, steps: int, path: Path) -> None:
    """Train the window's steps under the profiler and write its trace to `path` (through a temp file)."""
    device = trainer.world.device
    if device.type != "cuda":  # Kineto's own lines (ERROR: gpuGetDeviceCount failed) are noise without a GPU
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")

    def export(profiler: torch.profiler.profile) -> None:
        files.write_atomic(path, lambda tmp: profiler.export_chrome_trace(str(tmp)))

    schedule = torch.profiler.schedule(wait=0, warmup=PROFILER_WARMUP_STEPS, active=steps, repeat=1)
    with torch.profiler.profile(activities=activities(device), schedule=schedule, on_trace_ready=export) as profiler:
        # each step's device work inside its ProfilerStep span
        extra_steps(trainer, trainer.cfg.epochs + 1, PROFILER_WARMUP_STEPS + steps, profiler.step)


def step_seconds(trainer: Trainer, steps: int, first_epoch: int, synced: bool) -> list[float]:
    """Each of `steps` training steps' seconds (device work included), with DDP's gradient synchronisation or
    under its no_sync(): the same steps without communication."""
    synchronize(trainer.world.device)
    ends = [time.perf_counter()]
    with contextlib.nullcontext() if synced else trainer.train_model.no_sync():
        extra_steps(trainer, first_epoch, steps, lambda: ends.append(time.perf_counter()))
    return [end - start for start, end in itertools.pairwise(ends)]


def communication_cost(trainer: Trainer) -> dict:
    """Median step time with and without gradient communication (no_sync), over 2 × --profile-steps steps of each
    in the order synced, no-sync, no-sync, synced, after the profiled window; means over ranks. Their difference is
    what communication costs a step: the waits the trace shows, and the computation it slows where the two share
    cores or memory."""
    steps, epoch = trainer.cfg.profile_steps, trainer.cfg.epochs + 2
    times: dict[bool, list[float]] = {True: [], False: []}
    for synced in (True, False, False, True):
        times[synced] += step_seconds(trainer, steps, epoch, synced)
    synced_ms, alone_ms = (total / trainer.world.size * 1e3 for total in trainer.world.all_reduce(
        [statistics.median(times[True]), statistics.median(times[False])]))
    return {"synced_step_ms": synced_ms, "no_sync_step_ms": alone_ms,
            "communication_cost_share": max(0.0, synced_ms - alone_ms) / synced_ms}


def profile_window(trainer: Trainer, run_id: str) -> dict:
    """Record the window on every rank, then time synced against no-sync steps in a group; the "profile" part of
    the results record (means over ranks)."""
    world, steps = trainer.world, trainer.cfg.profile_steps
    run_id = world.gather_lists([run_id])[0]  # rank 0's: every rank names its trace after the record
    path = Path(trainer.cfg.output_dir) / trace_name(run_id, world.rank)
    record_steps(trainer, steps, path)
    breakdown = trace_breakdown.step_breakdown(json.loads(path.read_text()), gpu=world.device.type == "cuda")
    means = {name: total / world.size for name, total in zip(
        breakdown, world.all_reduce(list(breakdown.values())), strict=True)}
    cost = communication_cost(trainer) if world.distributed else {}
    return {"steps": steps, "traces": [trace_name(run_id, rank) for rank in range(world.size)], **means,
            "exposed_communication_share": trace_breakdown.exposed_share(means), **cost}
