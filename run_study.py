#!/usr/bin/env python3
"""The whole study in one command (hpml/study/command.py): every model at every world size, then the figures.
`--help` lists every flag."""

from hpml import cli
from hpml.study.command import main

if __name__ == "__main__":
    cli.run_script(main)
