#!/usr/bin/env python3
"""Submit, watch, collect and price SageMaker training jobs. `python sagemaker_submission.py --help` lists the
commands.

Its body is the module hpml.scripts.sagemaker_submission, which an installed hpml also runs as hpml-sagemaker."""

from hpml.scripts.sagemaker_submission import main, run_as_script

__all__ = ["main", "run_as_script"]  # `import sagemaker_submission` still gives the script's main

if __name__ == "__main__":
    run_as_script()
