"""hpml from Python (a notebook, a script): one run, a study, and its results.

Settings are the flags' names with underscores (`world_sizes="1,2"`, `dry_run=True`, `models=["vgg16",
"resnet18"]`), checked exactly as the flags are: a bad value raises UsageError with the flag's one-line message.

    import hpml
    records = hpml.run_training(model="resnet18", dataset="synthetic", subset=256, epochs=2)
    print("\\n".join(hpml.plan_study(where="sagemaker", world_sizes="1,8")))
    study = hpml.run_study(models="resnet18", world_sizes="1,2", dataset="synthetic", subset=256, epochs=2)
    study.rows[0]["speedup"], study.figures
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from hpml import cli, config, results
from hpml.errors import UsageError
from hpml.study import command, summary


class _Parser(cli.ArgumentParser):
    """The scripts' flags, with a bad one raised as UsageError instead of ending the process."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def flags(settings: dict[str, object]) -> list[str]:
    """Keyword settings as the command line they stand for: `epochs=2` -> ['--epochs', '2'], `quiet=True` ->
    ['--quiet', 'true'], a list -> its comma list; None leaves the flag at its default."""
    argv = []
    for name, value in settings.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        argv += [config.flag_of(name), str(value)]
    return argv


def run_training(**settings: object) -> list[dict]:
    """Train on one device, as run_hpc.py does (`model="resnet18,vgg16"` trains each); the results records written.
    Needs torch."""
    from hpml.training import dist, loop  # torch: only for training

    parser = _Parser(prog="hpml.run_training")
    cli.add_training_args(parser)
    cfg = cli.config_from_args(parser.parse_args(flags(settings)))
    paths = loop.run_models(cfg, dist.single_process(cfg.device))
    return [results.load_results(path) for path in paths]


@dataclass
class Study:
    """A study's outcome: `exit_code` 0 when every cell finished, the summary table (a dict per group, keyed by the
    columns of summary.md), the figures drawn, and the records in the output folder."""

    exit_code: int
    rows: list[dict] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)


def run_study(**settings: object) -> Study:
    """Run the study as run_study.py does (locally, on SLURM or on SageMaker: `where=`), then read back its results;
    `collect=True` with where="slurm" draws what has finished."""
    args = command.build_parser(_Parser).parse_args(flags(settings))
    code = command.run(args)
    records = load_results(args.output_dir) if Path(args.output_dir).is_dir() else []
    figures = sorted(Path(args.figures_dir).glob("*.png")) if records else []
    return Study(code, summary_table(records), figures, records)


def plan_study(**settings: object) -> list[str]:
    """What run_study would do with these settings, as its dry run prints it (the cells' commands, or for SageMaker
    the jobs with their models, time and cost): nothing is run or sent."""
    args = command.build_parser(_Parser).parse_args(flags({**settings, "dry_run": True}))
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        command.run(args)
    return printed.getvalue().splitlines()


def load_results(folder: str | Path, warn: Callable[[str], None] | None = None) -> list[dict]:
    """The valid results records in `folder`; each file skipped is passed to `warn` (default: ignored)."""
    records, skipped = results.load_all(folder)
    for message in skipped if warn else ():
        warn(f"skipped {message}")
    return records


def summary_table(records: Sequence[dict]) -> list[dict]:
    """summary.md's table as rows: one dict per group of runs (same model, world size and setup), keyed by its
    columns ("model", "world size", "epoch time (s)", "speedup", "final acc (%)", ...), values as printed there."""
    groups = summary.group_runs(list(records), warn=lambda _: None)
    return [dict(zip(summary.SUMMARY_COLUMNS, summary.summary_row(group), strict=True)) for group in groups]
