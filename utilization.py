#!/usr/bin/env python3
"""GPU monitoring through NVML, with host CPU and RAM. `python utilization.py --help` lists every flag.

Its body is the module hpml.scripts.utilization, which an installed hpml also runs as hpml-utilization."""

from hpml.scripts.utilization import main, run_as_script

__all__ = ["main", "run_as_script"]  # `import utilization` still gives the script's main

if __name__ == "__main__":
    run_as_script()
