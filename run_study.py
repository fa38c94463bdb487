#!/usr/bin/env python3
"""The whole study in one command: every model at every world size, then the figures. `--help` lists every flag.

Its body is the module hpml.scripts.run_study, which an installed hpml also runs as hpml-study."""

from hpml.scripts.run_study import main, run_as_script

__all__ = ["main", "run_as_script"]  # `import run_study` still gives the script's main

if __name__ == "__main__":
    run_as_script()
