#!/usr/bin/env python3
"""All-reduce time and bandwidth over message sizes, in the manner of nccl-tests' all_reduce_perf.

    torchrun --nproc_per_node 2 bench/allreduce.py --json allreduce.json
    torchrun --nproc_per_node 8 bench/allreduce.py --min-bytes 1M --max-bytes 1G     # one 8-GPU node, nccl

It times torch.distributed.all_reduce (sum, fp32) on the backend the world uses (gloo on CPUs, nccl on GPUs,
smddp inside a SageMaker SMDDP job), from --min-bytes to --max-bytes, doubling. Each timed call starts after a
barrier and ends when the device has finished; a call's time is the slowest rank's, and the figure is the median
over --iters calls after --warmup untimed ones. algbw is bytes / time; busbw is algbw x 2(n-1)/n, the traffic
each rank's link carries in a ring all-reduce, comparable across world sizes. The table marks the sizes where
each model's gradients fall (fp32, and bf16 as gradient compression would send them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hpml.errors import UsageError, one_line_on_ctrl_c  # noqa: E402

one_line_on_ctrl_c()  # before torch loads

import torch  # noqa: E402
import torch.distributed as torch_dist  # noqa: E402

import models  # noqa: E402
from hpml import cli, files, results  # noqa: E402
from hpml.config import BACKENDS, DEVICES, MAX_STEPS, TrainConfig  # noqa: E402
from hpml.training import dist  # noqa: E402
from hpml.training.loop import synchronize  # noqa: E402

FLOAT_BYTES = 4
MAX_MESSAGE_BYTES = 16 * 2**30  # a typo guard: far above any all-reduce a CNN makes
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def parse_size(text: str) -> int:
    """A byte count: 8, 64K, 256M or 1G (powers of 1024)."""
    number, unit = text[:-1], text[-1].upper()
    if unit not in UNITS or unit == "":
        number, unit = text, ""
    try:
        value = int(number) * UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a byte count such as 8, 64K, 256M or 1G, got {text!r}") from None
    if value < FLOAT_BYTES:
        raise argparse.ArgumentTypeError(f"expected at least {FLOAT_BYTES} bytes (one fp32 value), got {text!r}")
    if value > MAX_MESSAGE_BYTES:
        raise argparse.ArgumentTypeError(f"expected at most 16G, got {text!r}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-bytes", type=parse_size, default=8, help="smallest message (default: 8)")
    parser.add_argument("--max-bytes", type=parse_size, default=256 * 2**20, help="largest message (default: 256M)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per size (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per size first (default: %(default)s)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto (this rank's GPU when there is one), cpu or cuda (default: %(default)s)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="auto: smddp in a SageMaker SMDDP job, nccl on GPUs, else gloo (default: %(default)s)")
    parser.add_argument("--json", type=cli.path_flag, default=None,
                        help="also write the table as JSON here (rank 0)")
    args = parser.parse_args(argv)
    cli.require_positive(args, "iters")
    cli.require_at_most(args, iters=MAX_STEPS, warmup=MAX_STEPS)
    if args.warmup < 0:
        raise UsageError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.min_bytes > args.max_bytes:
        raise UsageError(f"--min-bytes {args.min_bytes} is larger than --max-bytes {args.max_bytes}")
    if args.json:
        files.check_output_file(args.json, "--json")
    if dist.launcher_from_env() == "none":
        raise UsageError("no launcher: start the ranks with torchrun --nproc_per_node N bench/allreduce.py "
                         "(a world of one has nothing to reduce)")
    return args


def message_sizes(min_bytes: int, max_bytes: int) -> list[int]:
    sizes, size = [], min_bytes - min_bytes % FLOAT_BYTES
    while size <= max_bytes:
        sizes.append(size)
        size *= 2
    return sizes


def time_all_reduce(world: dist.World, size: int, iters: int, warmup: int) -> float:
    """Median seconds of one all-reduce of `size` bytes, each call timed as its slowest rank saw it."""
    tensor = torch.ones(size // FLOAT_BYTES, dtype=torch.float32, device=world.device)
    times = []
    for call in range(warmup + iters):
        world.barrier()
        synchronize(world.device)
        start = time.perf_counter()
        torch_dist.all_reduce(tensor)
        synchronize(world.device)
        if call >= warmup:
            times.append(time.perf_counter() - start)
    slowest = world.all_reduce(times, op="max")
    return statistics.median(slowest)


def gradient_bytes() -> dict[str, dict]:
    """Each model's gradient size: fp32 as DDP reduces it, bf16 as compression would send it."""
    sizes = {}
    for name in models.names():
        params = sum(p.numel() for p in models.build(name).parameters())
        sizes[name] = {"params": params, "fp32_bytes": params * FLOAT_BYTES, "bf16_bytes": params * 2}
    return sizes


def models_at(size: int, gradients: dict[str, dict]) -> str:
    """The models whose gradients (fp32 or bf16) fall in [size, 2 x size)."""
    return ", ".join(f"{name} {kind}" for name, grads in gradients.items() for kind in ("fp32", "bf16")
                     if size <= grads[f"{kind}_bytes"] < 2 * size)


def human(size: int) -> str:
    for unit in ("G", "M", "K"):
        if size >= UNITS[unit] and size % UNITS[unit] == 0:
            return f"{size // UNITS[unit]}{unit}"
    return str(size)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    world = dist.setup(TrainConfig(device=args.device, backend=args.backend).validate())
    try:
        gradients = gradient_bytes()
        bus_factor = 2 * (world.size - 1) / world.size
        rows = []
        if world.is_main:
            print(f"all_reduce (sum, fp32) on {world.backend}, {world.size} ranks on {world.nodes} node(s), "
                  f"{world.device.type}; median of {args.iters} calls after {args.warmup}")
            print(f"{'bytes':>10}{'time (us)':>12}{'algbw (GB/s)':>14}{'busbw (GB/s)':>14}  gradients of")
        for size in message_sizes(args.min_bytes, args.max_bytes):
            seconds = time_all_reduce(world, size, args.iters, args.warmup)
            algbw = size / seconds / 1e9
            rows.append({"bytes": size, "time_us": seconds * 1e6, "algbw_gbps": algbw,
                         "busbw_gbps": algbw * bus_factor})
            if world.is_main:
                print(f"{human(size):>10}{seconds * 1e6:>12.1f}{algbw:>14.3f}{algbw * bus_factor:>14.3f}  "
                      f"{models_at(size, gradients)}", flush=True)
        if world.is_main and args.json:
            report = {"backend": world.backend, "world_size": world.size, "nodes": world.nodes,
                      "device": world.device.type, "iters": args.iters, "warmup": args.warmup,
                      "environment": results.environment(world.device), "sizes": rows, "models": gradients}
            results.write_json_atomic(args.json, report)
            print(f"-> {args.json}")
    finally:
        dist.teardown()
    return 0


if __name__ == "__main__":
    cli.run_script(main)
