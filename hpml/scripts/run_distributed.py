"""Data-parallel training on torch.distributed (DDP): torchrun, srun + torchrun, or a SageMaker job.

    torchrun --nproc_per_node 2 run_distributed.py --model resnet18 --epochs 20

Same flags and training loop as run_hpc.py, plus --backend {auto,smddp,nccl,gloo}, --dist-timeout, --scale-lr.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

from hpml.errors import one_line_on_ctrl_c

one_line_on_ctrl_c()  # before torch loads

from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

from hpml import cli  # noqa: E402
from hpml.errors import RunStopped  # noqa: E402
from hpml.training import dist, loop  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(description="Train CIFAR-10 CNNs data-parallel with DistributedDataParallel; "
                                            "rank 0 writes a results JSON per model.")
    cli.add_training_args(parser)
    cli.add_distributed_args(parser)
    cfg = cli.config_from_args(parser.parse_args(argv))
    world = dist.setup(cfg)
    lost = (f"rank {world.rank} of {world.size}: another rank stopped, or did not answer within --dist-timeout "
            f"{cfg.dist_timeout:g} s; its own error, if it printed one, says why")
    try:
        with dist.ranks_lost_in_one_line(lost):
            loop.run_models(cfg, world, log=print if world.is_main else lambda _: None)
    except RunStopped as stop:
        if stop.agreed and not world.is_main:
            return stop.exit_code  # every rank stopped at the same step: rank 0 says so for all of them
        raise
    finally:
        dist.teardown()
    return 0


def run_as_script() -> NoReturn:
    """main on the command line, as run_distributed.py, `torchrun -m hpml.scripts.run_distributed` and
    hpml-run-distributed run it."""
    # @record outside run_script: an error it reports in one line ends the rank with its exit code only, where inside
    # torchrun would print the rank's traceback again in its summary; any other error is recorded for that summary.
    record(cli.run_script)(main)


if __name__ == "__main__":
    run_as_script()
