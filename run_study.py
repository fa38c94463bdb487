#!/usr/bin/env python3
"""The whole study in one command: every model at every world size, then the figures. `--help` lists every flag.

    python run_study.py --models resnet18,shufflenetv2 --world-sizes 1,2 --dataset synthetic --subset 256 --epochs 1

World size 1 runs run_hpc.py (the single-device baseline), larger ones torchrun --standalone with that many
run_distributed.py processes (one per GPU, or gloo processes on a CPU). Cells whose results are already in
--output-dir are skipped, so an interrupted study continues where it stopped. The exit code is 0 only when every
cell finished.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from hpml import cli, files, results, slurm, study
from hpml.config import TrainConfig
from hpml.errors import UsageError


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.require_positive(args, "repeats", "gpus_per_node")
    args.model = args.models
    cfg = cli.config_from_args(args)
    world_sizes = study.parse_world_sizes(args.world_sizes)
    cells = study.plan(cfg.models, world_sizes, args.repeats)
    if args.where == "slurm":
        slurm.check_time_limit(args.time_limit)
        for size in world_sizes:
            slurm.nodes_and_gpus(size, args.gpus_per_node)
    elif args.collect:
        raise UsageError(f"--collect gathers the results of --where slurm jobs; --where {args.where} runs the cells "
                         "and draws at the end")
    output_dir, figures_dir = results.check_writable(cfg.output_dir), results.check_writable(args.figures_dir)
    if args.collect:
        return draw_finished(cells, cfg, output_dir, figures_dir)
    records, _ = results.load_all(output_dir)
    to_run = study.cells_to_run(cells, records, cfg, force=args.force)
    print(f"{cli.count(len(cells), 'cell')}: {len(cells) - len(to_run)} already in {output_dir}, "
          f"{len(to_run)} to run")
    if args.where == "slurm":
        return submit_to_slurm(args, cfg, to_run, output_dir)
    if args.dry_run:
        for cell in to_run:
            print(" ".join(study.local_command(cell, cfg)))
        return 0
    for cell in study.run_cells(to_run, lambda cell: study.local_command(cell, cfg)):
        print(f"failed: {cell}")
    return draw_finished(cells, cfg, output_dir, figures_dir)


def submit_to_slurm(args: argparse.Namespace, cfg: TrainConfig, to_run: list[study.Cell], output_dir: Path) -> int:
    """One sbatch script per cell, in <output-dir>/slurm/, submitted (printed with --dry-run). A cell submitted
    before is not submitted again (unless --force): its job may still be queued."""
    folder = output_dir / "slurm"
    for cell in to_run:
        script = slurm.batch_script(cell, cfg, args.gpus_per_node, args.time_limit, folder)
        path, job_file = folder / f"{slurm.job_name(cell)}.sbatch", folder / f"{slurm.job_name(cell)}.job"
        if args.dry_run:
            print(f"# {path}\n{script}")
        elif job_file.exists() and not args.force:
            print(f"{cell}: submitted before as job {job_file.read_text().strip()}, not again (--force to resubmit)")
        else:
            files.write_atomic(path, lambda tmp, script=script: tmp.write_text(script))
            job = slurm.submit(path)
            files.write_atomic(job_file, lambda tmp, job=job: tmp.write_text(job + "\n"))
            print(f"{cell}: submitted as job {job} ({path})")
    if not args.dry_run:
        print("when the jobs have ended, run the same command with --collect to draw what has finished")
    return 0


def draw_finished(cells: list[study.Cell], cfg: TrainConfig, output_dir: Path, figures_dir: Path) -> int:
    """Draw every result in the output folder; exit code 0 only when every cell of the study has its results."""
    records, _ = results.load_all(output_dir)
    missing = study.cells_to_run(cells, records, cfg)
    if records:
        from hpml import plots  # only now: importing matplotlib takes a moment

        plots.make_all(output_dir, figures_dir)
    print(f"{len(cells) - len(missing)} of {cli.count(len(cells), 'cell')} finished"
          + (f"; no results yet for {', '.join(map(str, missing))}" if missing else ""))
    return 1 if missing else 0


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    matrix = parser.add_argument_group("the study")
    matrix.add_argument("--models", default="all", help="'all' or a comma list of the names --model of "
                        "run_hpc.py takes: vgg16, resnet18, mobilenetv2, shufflenetv2, densenet121 (default: all)")
    matrix.add_argument("--world-sizes", default="1,2", help="comma list of process counts (GPUs, or CPU processes "
                        "without a GPU); 1 is the single-device baseline (default: %(default)s)")
    matrix.add_argument("--repeats", type=int, default=1, help="runs of every model and world size, for medians and "
                        "min-max spreads (default: %(default)s)")
    matrix.add_argument("--figures-dir", default="results_img", help="folder for the figures and summary.md drawn "
                        "at the end (default: %(default)s)")
    cli.add_switch(matrix, "--force", "run every cell again, even those whose results are already in --output-dir")
    cli.add_switch(matrix, "--dry-run", "print the command (with --where slurm: the batch script) of every cell "
                                        "still to run, and run or submit nothing")
    matrix.add_argument("--where", choices=("local", "slurm"), default="local",
                        help="local: every cell in turn on this machine; slurm: one sbatch script per cell, "
                             "submitted with sbatch (default: %(default)s)")
    cli.add_switch(matrix, "--collect", "--where slurm: draw whatever cells have finished, and say which have not")
    cluster = parser.add_argument_group("SLURM (--where slurm; not tested against a real SLURM)")
    cluster.add_argument("--gpus-per-node", type=int, default=4,
                         help="GPUs of a node; a world size above it must fill whole nodes (default: %(default)s)")
    cluster.add_argument("--time-limit", default="01:00:00",
                         help="each job's sbatch --time, e.g. 30:00 or 1-00:00:00 (default: %(default)s)")
    cli.add_training_args(parser, leave_out=("--model",))
    cli.add_distributed_args(parser)
    return parser


if __name__ == "__main__":
    cli.run_script(main)
