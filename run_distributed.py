#!/usr/bin/env python3
"""Data-parallel training on torch.distributed (DDP): torchrun, srun + torchrun, or a SageMaker job.

    torchrun --nproc_per_node 2 run_distributed.py --model resnet18 --epochs 20

Same flags and training loop as run_hpc.py, plus --backend {auto,smddp,nccl,gloo}, --dist-timeout, --scale-lr.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.distributed.elastic.multiprocessing.errors import record

from hpml import cli, dist, experiment


@record
def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(description="Train CIFAR-10 CNNs data-parallel with DistributedDataParallel; "
                                            "rank 0 writes a results JSON per model.")
    cli.add_training_args(parser)
    cli.add_distributed_args(parser)
    cfg = cli.config_from_args(parser.parse_args(argv))
    world = dist.setup(cfg)
    try:
        experiment.run_models(cfg, world, log=print if world.is_main else lambda _: None)
    finally:
        dist.teardown()
    return 0


if __name__ == "__main__":
    cli.run_script(main)
