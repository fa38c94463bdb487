"""The scripts, one module each: run_hpc.py's body is hpml.scripts.run_hpc, and so on, so that an installed package
runs everything a checkout does. Each module's `run_as_script` runs its `main` on the command line, its errors in
one line (cli.run_script): what the checkout's script, `python -m hpml.scripts.<name>` and the console script
(hpml-run-hpc, ...) run.
"""
