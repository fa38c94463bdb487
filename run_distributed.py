#!/usr/bin/env python3
"""Data-parallel training on torch.distributed (DDP): `torchrun --nproc_per_node 2 run_distributed.py --model resnet18`.
`--help` lists every flag.

Its body is the module hpml.scripts.run_distributed, which an installed hpml also runs as hpml-run-distributed."""

from hpml.scripts.run_distributed import main, run_as_script

__all__ = ["main", "run_as_script"]  # `import run_distributed` still gives the script's main

if __name__ == "__main__":
    run_as_script()
