"""The whole study in one command: run_study.py, `python -m hpml.scripts.run_study` and hpml-study. Its flags and its
work are hpml.study.command's; `--help` lists every flag."""

from typing import NoReturn

from hpml import cli
from hpml.study.command import main


def run_as_script() -> NoReturn:
    """main on the command line, as run_study.py, `python -m hpml.scripts.run_study` and hpml-study run it."""
    cli.run_script(main)


if __name__ == "__main__":
    run_as_script()
