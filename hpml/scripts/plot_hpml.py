"""The study's figures and summary table from results JSON files. `python plot_hpml.py --help` lists every flag."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

from hpml import cli, files
from hpml.errors import UsageError, script_name


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        description="Read every results JSON in --results-dir (runs of run_hpc.py, run_distributed.py and "
                    "collected SageMaker jobs), group repeated runs, and write Time.png, Accuracy.png, Curves.png, "
                    "Speedup.png, Utilization.png (when monitor samples exist) and summary.md to --output-dir.",
        epilog="Runs are grouped by model, mode, backend, world size, nodes and gradient communication within a "
               "setup: platform (SageMaker or local), hardware (GPU or CPU model), speed settings (precision, "
               "loader, memory layout, CUDA graphs, compile, drop-last) and data (data set, size, epochs). Runs of "
               "different setups share no median and no baseline. A group's numbers are medians over its runs, "
               "min-max as error bars. Speedup (steady-state) = median epoch time after the first epoch of the "
               "single-device group of the same model and setup / the group's; scaling efficiency = speedup / "
               "world size; the speedup in total training time (warm-up included) is shown beside it. A group "
               "without such a baseline says why instead of showing a number.")
    parser.add_argument("--results-dir", type=cli.path_flag, default="results",
                        help="folder holding the results JSON files (and the monitor's .utilization.csv files "
                             "beside them); other or malformed JSON files there (a field missing, of the wrong type "
                             "or out of range) are skipped with a warning naming the file and the field "
                             "(default: %(default)s)")
    parser.add_argument("--output-dir", type=cli.path_flag, default="results_img",
                        help="folder for the figures and summary.md, created if needed; files of the same name "
                             "are replaced (default: %(default)s)")
    parser.add_argument("--dpi", type=int, default=150,
                        help="resolution of the PNG figures in dots per inch, 50 to 600 (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 50 <= args.dpi <= 600:
        raise UsageError(f"--dpi must be between 50 and 600, got {args.dpi}")
    from hpml.study import plots  # after the flags are checked: importing matplotlib takes a moment

    try:
        plots.make_all(args.results_dir, args.output_dir, dpi=args.dpi)
    except OSError as error:  # a write that failed (full disk, file-size limit, read-only): the files before it stay
        message = files.cannot_write(error.filename or args.output_dir, error)
        print(f"{script_name()}: error: {message}", file=sys.stderr)
        return 1
    return 0


def run_as_script() -> NoReturn:
    """main on the command line, as plot_hpml.py, `python -m hpml.scripts.plot_hpml` and hpml-plot run it."""
    cli.run_script(main)


if __name__ == "__main__":
    run_as_script()
