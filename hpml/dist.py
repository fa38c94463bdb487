"""The world a run trains in: one process, or a torch.distributed group started by torchrun/SLURM/SageMaker."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from .errors import UsageError


@dataclass
class World:
    rank: int
    local_rank: int
    size: int
    nodes: int
    backend: str | None
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Reduce a few numbers over all ranks (sum or max); the identity in a world of one."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.reduce_device)
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX if op == "max" else torch_dist.ReduceOp.SUM)
        return tensor.tolist()

    @property
    def reduce_device(self) -> torch.device:
        return torch.device("cpu") if self.backend == "gloo" else self.device


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """auto -> this rank's CUDA device when there is one, else the CPU; cuda without CUDA is a UsageError."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu or --device auto")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise UsageError(f"local rank {local_rank} needs GPU {local_rank}, but this node has {count}; "
                         f"start at most {count} processes per node")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def single_process(device: str) -> World:
    """A world of one process on the chosen device."""
    return World(rank=0, local_rank=0, size=1, nodes=1, backend=None, device=resolve_device(device))
