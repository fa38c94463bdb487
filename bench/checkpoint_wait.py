#!/usr/bin/env python3
"""How long training waits for an epoch's checkpoint: a blocking write against hpml's background writer.

    python bench/checkpoint_wait.py --model resnet18 --device cpu

Blocking: torch.save into a temp file, flush to disk, rename (what training did before the background writer).
Background: checkpoint.BackgroundWriter.save, which serialises the state and leaves the write to a thread. The
state is what training checkpoints: the Trainer's weights, optimizer (Adadelta) and schedule state after a step.
The two alternate; between saves a pause of --gap seconds stands in for an epoch, so each background write has
finished before the next save. Reported: the median seconds training is held up per checkpoint, over --repeats
saves of each.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hpml.errors import UsageError, one_line_on_ctrl_c  # noqa: E402

one_line_on_ctrl_c()  # before torch loads

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from hpml import cli, data, files  # noqa: E402
from hpml.config import CHECKPOINT_FILE, MAX_REPEATS, TrainConfig, parse_model_list  # noqa: E402
from hpml.training import checkpoint, dist  # noqa: E402
from hpml.training.loop import Trainer, synchronize  # noqa: E402

MAX_GAP = 3_600  # an hour between saves: longer is a typo (and past what time.sleep takes, a traceback)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = cli.measurement_parser(__doc__, model="resnet18")
    parser.add_argument("--repeats", type=int, default=7, help="saves of each kind (default: %(default)s)")
    parser.add_argument("--gap", type=float, default=2.0,
                        help=f"seconds between saves, standing in for an epoch, at most {MAX_GAP} "
                             "(default: %(default)s)")
    parser.add_argument("--dir", type=cli.path_flag, default=None,
                        help="folder to write in, on the disk checkpoints go to (default: a temp folder)")
    args = parser.parse_args(argv)
    cli.require_positive(args, "repeats")
    cli.require_at_most(args, repeats=MAX_REPEATS)
    if not (math.isfinite(args.gap) and args.gap >= 0):
        raise UsageError(f"--gap must be 0 or more seconds, got {args.gap}")
    cli.require_at_most(args, gap=MAX_GAP)
    if args.dir is not None:
        files.check_writable(args.dir, "--dir")
    return args, parse_model_list(args.model)


def training_state(name: str, world: dist.World) -> dict:
    """What training checkpoints, after one step of the suite's Trainer on two synthetic images."""
    cfg = TrainConfig(models=[name], batch_size=2, device=world.device.type, quiet=True).validate()
    trainer = Trainer(cfg, name, world, data.synthetic_cifar10(2, 10))
    trainer.train_epoch(1, tqdm(disable=True))
    return {"identity": checkpoint.identity(cfg, name, world), "trainer": trainer.state_dict()}


def measure(name: str, args: argparse.Namespace, world: dist.World, folder: Path) -> dict:
    device = world.device
    state, path = training_state(name, world), folder / name / CHECKPOINT_FILE
    waits: dict[str, list[float]] = {"blocking": [], "background": []}
    with checkpoint.BackgroundWriter() as writer:
        for _ in range(args.repeats):
            for kind in waits:
                synchronize(device)
                start = time.perf_counter()
                if kind == "blocking":
                    files.write_atomic(path, lambda tmp: torch.save(state, tmp))
                else:
                    writer.write(path, state)
                waits[kind].append(time.perf_counter() - start)
                time.sleep(args.gap)
    return {kind: statistics.median(seconds) for kind, seconds in waits.items()} | {
        "megabytes": path.stat().st_size / 1e6}


def main(argv: Sequence[str] | None = None) -> int:
    args, names = parse_args(argv)
    world = dist.single_process(args.device)
    print(f"{'model':<14}{'MB':>6}{'blocking s':>12}{'background s':>14}{'ratio':>8}")
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for name in names:
            figures = measure(name, args, world, Path(folder))
            print(f"{name:<14}{figures['megabytes']:>6.0f}{figures['blocking']:>12.3f}{figures['background']:>14.3f}"
                  f"{figures['blocking'] / figures['background']:>7.1f}x")
    return 0


if __name__ == "__main__":
    cli.run_script(main)
