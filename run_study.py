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

from hpml import cli, results, study


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.require_positive(args, "repeats")
    args.model = args.models
    cfg = cli.config_from_args(args)
    cells = study.plan(cfg.models, study.parse_world_sizes(args.world_sizes), args.repeats)
    output_dir, figures_dir = results.check_writable(cfg.output_dir), results.check_writable(args.figures_dir)
    records, _ = results.load_all(output_dir)
    to_run = study.cells_to_run(cells, records, cfg, force=args.force)
    print(f"{cli.count(len(cells), 'cell')}: {len(cells) - len(to_run)} already in {output_dir}, "
          f"{len(to_run)} to run")
    if args.dry_run:
        for cell in to_run:
            print(" ".join(study.local_command(cell, cfg)))
        return 0
    failed = study.run_cells(to_run, lambda cell: study.local_command(cell, cfg))
    for cell in failed:
        print(f"failed: {cell}")
    from hpml import plots  # after training: importing matplotlib takes a moment

    plots.make_all(output_dir, figures_dir)
    print(f"{len(cells) - len(failed)} of {cli.count(len(cells), 'cell')} finished"
          + (f"; {len(failed)} failed (rerun the same command to retry them)" if failed else ""))
    return 1 if failed else 0


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
    cli.add_switch(matrix, "--dry-run", "print the command of every cell still to run, and run nothing")
    cli.add_training_args(parser, leave_out=("--model",))
    cli.add_distributed_args(parser)
    return parser


if __name__ == "__main__":
    cli.run_script(main)
