#!/usr/bin/env python3
"""Training throughput: the classic reference setup against the suite's fast defaults, side by side.

    python bench/throughput.py --model resnet18 --device cpu --json b.json
    python bench/throughput.py --nproc 2            # also DDP scaling efficiency over 2 ranks
    python bench/throughput.py --ablate             # also the fast defaults with one setting changed at a time
    torchrun --nproc_per_node 2 bench/throughput.py --ddp --grad-compression none,fp16   # exposed communication
    torchrun --nproc_per_node 2 bench/throughput.py --ddp --model resnet18 --cuda-graphs off,on  # GPUs: overlap kept?
    torchrun --nproc_per_node 2 bench/throughput.py --ddp --profile   # the same against run_distributed.py --profile

Reference: DataLoader with --workers 2 and torchvision transforms, fp32, eager (no CUDA graphs), NCHW. Fast:
the defaults of run_hpc.py on this device. Both train the same model with the same code (hpml.training.loop.Trainer) on
CIFAR-shaped synthetic data; epochs of --steps steps alternate between the setups, the first epoch of each is
warm-up, and the figure is the median images/s over --repeats epochs.

With --ddp, under torchrun, it measures instead how much of a data-parallel step is communication that the
backward pass does not hide: the fast defaults' step time with DDP's gradient synchronisation, against the same
step under DDP's no_sync() (same per-rank batch, no all-reduce), per model, --grad-compression choice and
--cuda-graphs choice; with --profile also the exposed share that --profile reads from a trace of the same
trainer's next --steps steps. CUDA graphs are off under DDP by default because a graphed backward is one autograd
node, so no gradient bucket's all-reduce could start before it ended: `--cuda-graphs off,on` on GPUs measures what
that costs in exposed communication.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hpml.errors import UsageError, one_line_on_ctrl_c  # noqa: E402

one_line_on_ctrl_c()  # before torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from hpml import cli, data, files, results  # noqa: E402
from hpml.config import (  # noqa: E402
    GRAD_COMPRESSIONS,
    MAX_BATCH_SIZE,
    MAX_PROCESSES,
    MAX_REPEATS,
    MAX_STEPS,
    TrainConfig,
    parse_model_list,
)
from hpml.training import dist, profiling, speed  # noqa: E402
from hpml.training.loop import Trainer  # noqa: E402

ABLATIONS = {  # the fast defaults with one setting changed: what each setting is worth on this device
    "fast, fp32": {"precision": "fp32"},
    "fast, NCHW": {"channels_last": False},
    "fast, torch loader": {"loader": "torch", "workers": 2},
    "fast + compile": {"compile": True},  # replaces CUDA graphs on a GPU
}
CUDA_ABLATIONS = {"fast, no CUDA graphs": {"cuda_graphs": False}}


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = cli.measurement_parser(__doc__, model="all")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20,
                        help="steps per timed epoch; the classic loader starts its workers every epoch, as in "
                             "training, so very short epochs overstate its cost (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed epochs per setup after one warm-up epoch; the median is reported "
                             "(default: %(default)s)")
    parser.add_argument("--nproc", type=int, default=0,
                        help="also measure DDP scaling efficiency with this many ranks under torchrun "
                             "(default: off)")
    parser.add_argument("--ablate", action="store_true",
                        help="also measure the fast defaults with one setting changed at a time: "
                             + "; ".join([*ABLATIONS, *CUDA_ABLATIONS]) + " (on CUDA only); compiling adds a "
                             "minute or more per model (default: off)")
    parser.add_argument("--ddp", action="store_true",
                        help="under torchrun: the step time with gradient synchronisation against the same step "
                             "under no_sync(), per model and --grad-compression choice (default: off)")
    parser.add_argument("--grad-compression", default="none",
                        help="with --ddp: a comma list of " + ", ".join(GRAD_COMPRESSIONS) + " (default: %(default)s)")
    parser.add_argument("--cuda-graphs", default="off",
                        help="with --ddp on GPUs: a comma list of off and on, CUDA graphs in the measured steps "
                             "(default: %(default)s, as under DDP in training)")
    parser.add_argument("--profile", action="store_true",
                        help="with --ddp: after each timed round, record --steps more steps of the same trainer "
                             "under torch.profiler as run_distributed.py --profile does, and report the exposed "
                             "share read from the traces (median over the rounds) beside the measured one "
                             "(default: off)")
    parser.add_argument("--json", type=cli.path_flag, default=None,
                        help="write the figures to this JSON file (default: not written)")
    args = parser.parse_args(argv)
    cli.require_positive(args, "batch_size", "steps", "repeats")
    cli.require_at_most(args, batch_size=MAX_BATCH_SIZE, steps=MAX_STEPS, repeats=MAX_REPEATS, nproc=MAX_PROCESSES)
    if args.nproc < 0:
        raise UsageError(f"--nproc must be 0 (off) or more, got {args.nproc}")
    args.grad_compression = [part.strip() for part in args.grad_compression.split(",")]
    graphs = [part.strip() for part in args.cuda_graphs.split(",")]
    if not graphs or any(choice not in ("off", "on") for choice in graphs):
        raise UsageError(f"--cuda-graphs takes a comma list of off and on, got {args.cuda_graphs!r}")
    args.cuda_graphs = [choice == "on" for choice in graphs]
    if any(args.cuda_graphs) and not args.ddp:
        raise UsageError("--cuda-graphs on is for --ddp; the other measurements take CUDA graphs from the defaults "
                         "and --ablate")
    for choice in args.grad_compression:
        if choice not in GRAD_COMPRESSIONS:
            raise UsageError(f"--grad-compression takes a comma list of {', '.join(GRAD_COMPRESSIONS)}, "
                             f"got {choice!r}")
    if args.profile and not args.ddp:
        raise UsageError("--profile compares with --ddp's measurement; add --ddp (under torchrun)")
    if args.ddp and (args.nproc or args.ablate):
        raise UsageError("--ddp measures one world under torchrun; run --nproc and --ablate without it")
    if args.ddp and dist.launcher_from_env() != "torchrun":
        raise UsageError("--ddp: start it under torchrun, e.g. torchrun --nproc_per_node 2 bench/throughput.py --ddp")
    if args.json:
        files.check_output_file(args.json, "--json")
    return args, parse_model_list(args.model)


def measure_model(name: str, args: argparse.Namespace, world: dist.World, images: data.ImageSet) -> dict:
    common = {"models": [name], "batch_size": args.batch_size, "device": args.device, "quiet": True}
    ablations = {**ABLATIONS, **(CUDA_ABLATIONS if world.device.type == "cuda" else {})} if args.ablate else {}
    setups = {"reference": speed.REFERENCE_SETUP, "fast": {}, **ablations}
    trainers = {setup: Trainer(TrainConfig(**common, **changes).validate(), name, world, images)
                for setup, changes in setups.items()}
    rates: dict[str, list[float]] = {setup: [] for setup in trainers}
    order = list(trainers)
    with tqdm(total=len(order) * (args.repeats + 1), desc=name, unit="epoch", leave=False) as progress:
        for epoch in range(1, args.repeats + 2):
            for setup in order[epoch % len(order):] + order[:epoch % len(order)]:  # a new order every round
                stats = trainers[setup].train_epoch(epoch, tqdm(disable=True))
                if epoch > 1:  # the first epoch of each setup is warm-up (and compiles)
                    rates[setup].append(stats["images"] / stats["epoch_time_s"])
                progress.update(1)
    median = {setup: statistics.median(rates[setup]) for setup in rates}
    figures = {"reference_images_per_s": median["reference"], "fast_images_per_s": median["fast"],
               "speedup": median["fast"] / median["reference"],
               "repeats_images_per_s": {setup: rates[setup] for setup in ("reference", "fast")},
               "fast_settings": trainers["fast"].speed.as_dict(),
               "reference_settings": trainers["reference"].speed.as_dict()}
    if ablations:
        figures["ablations"] = {setup: {"images_per_s": median[setup], "vs_fast": median[setup] / median["fast"],
                                        "repeats_images_per_s": rates[setup]} for setup in ablations}
    return figures


def measure_ddp(name: str, args: argparse.Namespace, nproc: int) -> float:
    """Median images/s of run_distributed.py with `nproc` ranks (fast defaults), from its results JSON.

    It trains on synthetic images saved in the npz layout, with a test split of ten: evaluation is not timed.
    """
    with tempfile.TemporaryDirectory() as out:
        images = data.synthetic_cifar10(args.steps * args.batch_size * nproc, 10)
        for split in ("train", "test"):
            np.savez(Path(out) / f"{split}.npz", images=getattr(images, f"{split}_images"),
                     labels=getattr(images, f"{split}_labels"))
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(dist.free_port()), str(REPO / "run_distributed.py"), "--model", name,
                   "--data-dir", out, "--batch-size", str(args.batch_size), "--epochs", str(args.repeats + 1),
                   "--device", args.device, "--quiet", "--output-dir", str(Path(out) / "results")]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"torchrun with {nproc} ranks failed:\n{done.stdout}\n{done.stderr}")
        (record,) = results.load_all(Path(out) / "results")[0]
        return record["median_images_per_s"]


def measure_exposed_communication(name: str, compression: str, cuda_graphs: bool, args: argparse.Namespace,
                                  world: dist.World, images: data.ImageSet) -> dict:
    """Median step times (slowest rank) with DDP's synchronisation and under no_sync(), alternating epochs; with
    --profile, after each round's two epochs, the breakdown --profile reads from a trace of the next steps."""
    with tempfile.TemporaryDirectory() as traces:
        cfg = TrainConfig(models=[name], batch_size=args.batch_size, device=args.device, grad_compression=compression,
                          cuda_graphs=cuda_graphs, quiet=True, output_dir=traces, profile_steps=args.steps).validate()
        trainer = Trainer(cfg, name, world, images)
        ddp = getattr(trainer.train_model, "_orig_mod", trainer.train_model)  # under --compile, the module it wraps
        step_ms: dict[str, list[float]] = {"synced": [], "no_sync": []}
        profiles = []
        for epoch in range(1, args.repeats + 2):
            for setup in ("synced", "no_sync") if epoch % 2 else ("no_sync", "synced"):
                with ddp.no_sync() if setup == "no_sync" else contextlib.nullcontext():
                    stats = trainer.train_epoch(epoch, tqdm(disable=True))
                (slowest,) = world.all_reduce([stats["epoch_time_s"] / stats["steps"]], op="max")
                if epoch > 1:
                    step_ms[setup].append(slowest * 1e3)
            if args.profile and epoch > 1:
                profiles.append(profiling.profile_window(trainer, f"bench_{name}"))
    synced, alone = (statistics.median(step_ms[setup]) for setup in ("synced", "no_sync"))
    figures = {"step_ms": synced, "no_sync_step_ms": alone, "exposed_ms": synced - alone,
               "exposed_fraction": (synced - alone) / synced, "repeats_step_ms": step_ms}
    if profiles:
        figures["profile"] = {"exposed_communication_share": statistics.median(
                                  profile["exposed_communication_share"] for profile in profiles),
                              "step_ms": statistics.median(profile["step_ms"] for profile in profiles),
                              "repeats": [{k: v for k, v in profile.items() if k != "traces"} for profile in profiles]}
    return figures


def main_ddp(args: argparse.Namespace, names: list[str]) -> int:
    world = dist.setup(TrainConfig(device=args.device).validate(), log=lambda _: None)
    try:
        images = data.synthetic_cifar10(args.steps * args.batch_size * world.size, 10)
        report = {"device": device_name(world), "backend": world.backend, "world_size": world.size,
                  "batch_size": args.batch_size, "steps_per_epoch": args.steps, "repeats": args.repeats,
                  "environment": results.environment(world.device), "models": {}}
        if world.is_main:
            print(f"{world.size} ranks, {world.backend}, {report['device']}: step time with and without DDP's "
                  "gradient synchronisation")
            print(f"{'model':<14}{'compression':<13}{'step ms':>9}{'no_sync ms':>12}{'exposed ms':>12}{'exposed':>9}"
                  + (f"{'trace step ms':>15}{'trace exposed':>15}" if args.profile else ""))
        for name in names:
            report["models"][name] = {}
            for compression in args.grad_compression:
                for graphs in args.cuda_graphs:
                    figures = measure_exposed_communication(name, compression, graphs, args, world, images)
                    setup = f"{compression}, CUDA graphs" if graphs else compression
                    report["models"][name][setup] = figures
                    if world.is_main:
                        print(f"{name:<14}{setup:<13}{figures['step_ms']:>9.1f}"
                              f"{figures['no_sync_step_ms']:>12.1f}{figures['exposed_ms']:>12.1f}"
                              f"{figures['exposed_fraction']:>8.0%}" + profile_columns(figures.get("profile")),
                              flush=True)
        if world.is_main and args.json:
            results.write_json_atomic(args.json, report)
            print(f"wrote {args.json}")
    finally:
        dist.teardown()
    return 0


def profile_columns(profile: dict | None) -> str:
    if profile is None:
        return ""
    return f"{profile['step_ms']:>15.1f}{profile['exposed_communication_share']:>14.0%}"


def main(argv: Sequence[str] | None = None) -> int:
    args, names = parse_args(argv)
    if args.ddp:
        return main_ddp(args, names)
    world = dist.single_process(args.device)
    if world.device.type == "cuda" and args.nproc > torch.cuda.device_count():
        raise UsageError(f"--nproc {args.nproc} needs {args.nproc} GPUs (one per rank); this machine has "
                         f"{torch.cuda.device_count()}")
    images = data.synthetic_cifar10(args.steps * args.batch_size, 10)
    report = {"device": device_name(world), "batch_size": args.batch_size, "steps_per_epoch": args.steps,
              "repeats": args.repeats, "environment": results.environment(world.device), "models": {}}
    print(f"{'model':<14}{'reference img/s':>17}{'fast img/s':>12}{'speedup':>9}")
    for name in names:
        figures = measure_model(name, args, world, images)
        report["models"][name] = figures
        print(f"{name:<14}{figures['reference_images_per_s']:>17.1f}{figures['fast_images_per_s']:>12.1f}"
              f"{figures['speedup']:>8.2f}x")
        for setup, ablation in figures.get("ablations", {}).items():
            print(f"  {setup:<26}{ablation['images_per_s']:>12.1f}{ablation['vs_fast']:>8.2f}x of fast")
    if args.nproc:
        report["ddp"] = {"nproc": args.nproc, "models": {}}
        print(f"\n{'model':<14}{'1 rank img/s':>14}{f'{args.nproc} ranks img/s':>16}{'efficiency':>12}")
        for name in names:
            one, many = measure_ddp(name, args, 1), measure_ddp(name, args, args.nproc)
            efficiency = many / (args.nproc * one)
            report["ddp"]["models"][name] = {"one_rank_images_per_s": one, "n_rank_images_per_s": many,
                                             "scaling_efficiency": efficiency}
            print(f"{name:<14}{one:>14.1f}{many:>16.1f}{efficiency:>11.0%}")
    if args.json:
        results.write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    return 0


def device_name(world: dist.World) -> str:
    env = results.environment(world.device)
    threads = cli.count(env["torch_threads"], "thread")
    return env["gpu"] if world.device.type == "cuda" else f"cpu: {env['cpu']} ({threads})"


if __name__ == "__main__":
    cli.run_script(main)
