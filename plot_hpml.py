#!/usr/bin/env python3
"""The study's figures and summary table from results JSON files. `python plot_hpml.py --help` lists every flag.

Its body is the module hpml.scripts.plot_hpml, which an installed hpml also runs as hpml-plot."""

from hpml.scripts.plot_hpml import main, run_as_script

__all__ = ["main", "run_as_script"]  # `import plot_hpml` still gives the script's main

if __name__ == "__main__":
    run_as_script()
