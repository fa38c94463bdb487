"""Single-device training: one GPU or the CPU. `python run_hpc.py --help` lists every flag."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

from hpml.errors import one_line_on_ctrl_c

one_line_on_ctrl_c()  # before torch loads

from hpml import cli  # noqa: E402
from hpml.training import dist, loop  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(description="Train CIFAR-10 CNNs on one device and write a results JSON per model.")
    cli.add_training_args(parser)
    cfg = cli.config_from_args(parser.parse_args(argv))
    world = dist.single_process(cfg.device)
    loop.run_models(cfg, world)
    return 0


def run_as_script() -> NoReturn:
    """main on the command line, as run_hpc.py, `python -m hpml.scripts.run_hpc` and hpml-run-hpc run it."""
    cli.run_script(main)


if __name__ == "__main__":
    run_as_script()
