"""GPU monitoring through NVML, with host CPU and RAM: a live table, one snapshot, a CSV log, a JSON summary.

`python utilization.py --help` lists every flag.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn, TextIO

from hpml import cli, files, monitor
from hpml.config import MAX_SAMPLE_INTERVAL, MIN_SAMPLE_INTERVAL
from hpml.errors import RunStopped, UsageError, WriteFailed, one_line

CPU_WINDOW_S = 0.25  # --once: CPU % is an average over a window, so wait this long before the one reading
MAX_DURATION = 366 * 24 * 3_600  # a year: anything longer is a typo (and past time_t's range, a traceback)
HEADER_EVERY = 20  # lines between repeated headers when the output is not a terminal, as nvidia-smi dmon does
GPU_COLUMNS = (("t s", 7), ("gpu", 3), ("name", 22), ("util %", 6), ("memory MiB", 17), ("power W", 7),
               ("temp C", 6), ("SM MHz", 6), ("CPU %", 6), ("RAM MiB", 15))
HOST_COLUMNS = (("t s", 7), ("CPU %", 6), ("RAM MiB", 15))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(
        description="Watch every NVIDIA GPU through NVML (utilization, memory, power, temperature, SM clock) and "
                    "the host's CPU and RAM. Without a driver it says so and shows CPU and RAM only.")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--once", action="store_true", help="print one snapshot and exit (default: watch)")
    when.add_argument("--duration", type=float, default=None, metavar="S",
                      help="stop after S seconds, at most a year (default: run until Ctrl-C)")
    parser.add_argument("--interval", type=float, default=1.0, metavar="S",
                        help=f"seconds between samples, {MIN_SAMPLE_INTERVAL} to {MAX_SAMPLE_INTERVAL} "
                             "(default: %(default)s)")
    parser.add_argument("--csv", type=cli.path_flag, default=None, metavar="FILE",
                        help="append every sample to FILE, one row per GPU (header written when the file is new) "
                             "(default: not written)")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON summary at the end (mean/max utilization, peak memory per GPU) on "
                             "stdout; the live table then goes to stderr (default: off)")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.interval) and args.interval > 0):
        raise UsageError(f"--interval must be a positive number of seconds, got {args.interval}")
    if args.duration is not None and not (math.isfinite(args.duration) and args.duration > 0):
        raise UsageError(f"--duration must be a positive number of seconds, got {args.duration}")
    cli.require_at_most(args, duration=MAX_DURATION)
    if not MIN_SAMPLE_INTERVAL <= args.interval <= MAX_SAMPLE_INTERVAL:
        raise UsageError(f"--interval must be between {MIN_SAMPLE_INTERVAL} and {MAX_SAMPLE_INTERVAL} seconds, "
                         f"got {args.interval}")
    if args.duration is not None and args.duration < args.interval:
        raise UsageError(f"--duration {args.duration} is shorter than --interval {args.interval}: no sample would be "
                         "taken; give a --duration of at least one interval")
    return args


class Table:
    """The live view: redrawn in place on a terminal, one line per GPU per sample otherwise."""

    def __init__(self, stream: TextIO, interval: float):
        self.stream = stream
        self.interval = interval
        self.redraw = stream.isatty()
        self.lines = 0

    def show(self, rows: list[dict]) -> None:
        self.columns = GPU_COLUMNS if rows[0]["gpu"] is not None else HOST_COLUMNS
        lines = [self.format_row(row) for row in rows]
        if self.redraw:
            title = f"{rows[0]['host']}  {rows[0]['timestamp']}  every {self.interval:g} s, Ctrl-C to stop"
            self.print("\x1b[H\x1b[J" + "\n".join([title, self.header(), *lines]))
            return
        if self.lines % HEADER_EVERY == 0:
            self.print(self.header())
        self.print("\n".join(lines))
        self.lines += len(lines)

    def print(self, text: str) -> None:
        """Print `text`, with what the stream's encoding cannot show (a GPU's or host's é under a C locale) escaped."""
        encoding = getattr(self.stream, "encoding", None) or "utf-8"
        print(text.encode(encoding, "backslashreplace").decode(encoding), file=self.stream, flush=True)

    def header(self) -> str:
        return "  ".join(title.rjust(width) if title != "name" else title.ljust(width)
                         for title, width in self.columns)

    def format_row(self, row: dict) -> str:
        cells = {
            "t s": f"{row['elapsed_s']:.1f}",
            "gpu": _cell(row["gpu"]),
            "name": (row["gpu_name"] or "-")[:22],
            "util %": _cell(row["gpu_util_pct"]),
            "memory MiB": f"{_cell(row['mem_used_mib'], '.0f')} / {_cell(row['mem_total_mib'], '.0f')}",
            "power W": _cell(row["power_w"], ".1f"),
            "temp C": _cell(row["temp_c"]),
            "SM MHz": _cell(row["sm_clock_mhz"]),
            "CPU %": _cell(row["cpu_pct"], ".1f"),
            "RAM MiB": f"{_cell(row['ram_used_mib'], '.0f')} / {_cell(row['ram_total_mib'], '.0f')}",
        }
        return "  ".join(cells[title].ljust(width) if title == "name" else cells[title].rjust(width)
                         for title, width in self.columns)


def _cell(value: float | None, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def announce_gpus(gpus: list[monitor.Gpu], nvml_error: str | None) -> None:
    """One line on stderr when there is no GPU to show."""
    if nvml_error is not None:
        print(f"{cli.script_name()}: no NVIDIA GPU readable (NVML: {nvml_error}); showing CPU and RAM only",
              file=sys.stderr)
    elif not gpus:
        print(f"{cli.script_name()}: NVML found no NVIDIA GPU; showing CPU and RAM only", file=sys.stderr)


def snapshot(args: argparse.Namespace, view: TextIO) -> tuple[list[dict], str | None]:
    with monitor.Sampler() as sampler:
        announce_gpus(sampler.gpus, sampler.nvml_error)
        time.sleep(CPU_WINDOW_S)
        rows = sampler.read()
    Table(view, args.interval).show(rows)
    append_to_csv(args.csv, rows)
    return rows, sampler.nvml_error


def watch(args: argparse.Namespace, view: TextIO) -> tuple[list[dict], str | None]:
    """Sample until --duration has passed or Ctrl-C; each sample is shown and appended to --csv at once."""
    table = Table(view, args.interval)
    finished = threading.Event()

    def record(rows: list[dict]) -> None:
        try:
            append_to_csv(args.csv, rows)
            table.show(rows)
        except BaseException:
            finished.set()  # the monitor re-raises this when the block ends
            raise
        if args.duration is not None and rows[0]["elapsed_s"] >= args.duration - 1e-3:
            finished.set()

    sampling = monitor.Monitor(args.interval, on_sample=record)
    try:
        with sampling:
            announce_gpus(sampling.gpus, sampling.nvml_error)
            # Wake up now and then: a Ctrl-C that the OS hands to the sampling thread is only acted on once the
            # main thread runs Python again, and an untimed wait would never return.
            while not finished.wait(timeout=0.2) and sampling.running:
                pass  # a sampling thread that failed has ended: leaving the block re-raises its error
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a live view ends: the samples so far still count
    return sampling.samples, sampling.nvml_error


def append_to_csv(path: Path | None, rows: list[dict]) -> None:
    """Add a sample's rows to --csv, if given; WriteFailed when the file cannot take them."""
    if path is None:
        return
    with files.write_errors_in_one_line(path):
        monitor.write_samples_csv(path, rows, append=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.csv:
        monitor.check_csv_path(args.csv)
    view = sys.stderr if args.json else sys.stdout
    try:
        rows, nvml_error = (snapshot if args.once else watch)(args, view)
    except (UsageError, WriteFailed):
        raise
    except BrokenPipeError:  # the reader of the table went away (`| head`): end quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), view.fileno())
        return 1
    except Exception as error:  # a sampling failure (the thread's, re-raised here) ends the program in one line
        raise RunStopped(f"sampling stopped: {type(error).__name__}: {one_line(error)}", exit_code=1) from None
    if args.json:
        summary = monitor.summarize(rows, args.interval, nvml_error=nvml_error, samples_csv=str(args.csv))
        print(json.dumps(summary, indent=2))
    return 0


def run_as_script() -> NoReturn:
    """main on the command line, as utilization.py, `python -m hpml.scripts.utilization` and hpml-utilization run it."""
    cli.run_script(main)


if __name__ == "__main__":
    run_as_script()
