"""The scripts, one module each: run_hpc.py's body is hpml.scripts.run_hpc, and so on, so that an installed package
runs everything a checkout does. Each module's `run_as_script` runs its `main` on the command line, its errors in
one line (cli.run_script): what the checkout's script, `python -m hpml.scripts.<name>` and the console script
(hpml-run-hpc, ...) run.

The training processes that a study's cells and batch jobs start run these modules with `python -m`, from this
same package: `pythonpath` puts the folder it is imported from first.
"""

import os
from pathlib import Path

SINGLE_DEVICE = "hpml.scripts.run_hpc"  # the single-device path: one process on one GPU, the speedups' baseline
DATA_PARALLEL = "hpml.scripts.run_distributed"
# The folder this hpml package is imported from: a checkout's root, or where it is installed.
IMPORT_ROOT = Path(__file__).resolve().parents[2]


def pythonpath(inherited: str | None) -> str:
    """PYTHONPATH for a process that runs one of these modules: IMPORT_ROOT first, so that it imports this very
    package wherever it runs, then the `inherited` PYTHONPATH."""
    return os.pathsep.join([str(IMPORT_ROOT), *([inherited] if inherited else [])])
