#!/usr/bin/env python3
"""Single-device training: one GPU or the CPU. `python run_hpc.py --help` lists every flag.

Its body is the module hpml.scripts.run_hpc, which an installed hpml also runs as hpml-run-hpc."""

from hpml.scripts.run_hpc import main, run_as_script

__all__ = ["main", "run_as_script"]  # `import run_hpc` still gives the script's main

if __name__ == "__main__":
    run_as_script()
