"""The world a run trains in: one process, or a torch.distributed group started by torchrun, SLURM or SageMaker."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from .config import TrainConfig
from .errors import UsageError


@dataclass
class World:
    rank: int
    local_rank: int
    size: int
    nodes: int
    backend: str | None
    device: torch.device
    launcher: str = "none"
    sagemaker: dict | None = field(default=None)

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

    def gather_lists(self, items: list) -> list:
        """Every rank's list, concatenated in rank order (on every rank); the list itself in a world of one."""
        if not self.distributed:
            return list(items)
        gathered: list[list | None] = [None] * self.size
        torch_dist.all_gather_object(gathered, items)
        return [item for rank_items in gathered for item in rank_items]

    def barrier(self) -> None:
        if self.distributed:
            torch_dist.barrier()

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
    """A world of one process on the chosen device, with no process group."""
    return World(rank=0, local_rank=0, size=1, nodes=1, backend=None, device=resolve_device(device))


# ---- torch.distributed ---------------------------------------------------------------------------

def launcher_from_env() -> str:
    """Which launcher started this process: torchrun (or anything setting WORLD_SIZE), mpirun, or none."""
    if "WORLD_SIZE" in os.environ:
        return "torchrun"
    if "OMPI_COMM_WORLD_SIZE" in os.environ:
        return "mpirun"
    return "none"


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return default


def smddp_available() -> bool:
    """Import SMDDP's torch backend if this is one of SageMaker's containers that ship it.

    The only place in the suite that imports smdistributed: the import registers the "smddp" backend.
    """
    try:
        import smdistributed.dataparallel.torch.torch_smddp  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(requested: str, device: torch.device, launcher: str) -> str:
    """The backend to use; UsageError when the requested one cannot work here."""
    if requested == "auto":
        if in_sagemaker() and launcher == "mpirun" and smddp_available():  # SageMaker starts SMDDP with mpirun
            return "smddp"
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "smddp":
        if not smddp_available():
            raise UsageError("--backend smddp: the SMDDP library (smdistributed.dataparallel) is not installed here; "
                             "it exists only in SageMaker's GPU training containers; use --backend auto, nccl or gloo")
        if device.type != "cuda":
            raise UsageError("--backend smddp needs CUDA GPUs; use --backend gloo on the CPU")
    if requested == "nccl" and (device.type != "cuda" or not torch_dist.is_nccl_available()):
        raise UsageError("--backend nccl needs CUDA GPUs and a torch built with NCCL; "
                         "use --backend gloo (CPU) or --backend auto")
    if requested == "gloo" and not torch_dist.is_gloo_available():
        raise UsageError("--backend gloo: this torch was built without gloo; use --backend nccl on GPUs")
    return requested


def setup(cfg: TrainConfig, log: Callable[[str], None] = print) -> World:
    """Join the process group the launcher set up, or form a world of one when there is no launcher."""
    launcher = launcher_from_env()
    local_rank = _env_int("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", default=0)
    device = resolve_device(cfg.device, local_rank)
    backend = choose_backend(cfg.backend, device, launcher)
    timeout = timedelta(seconds=cfg.dist_timeout)
    if launcher == "none" and backend != "smddp":
        log("run_distributed.py: no launcher found (WORLD_SIZE is unset): training as a world of one process; "
            "start several with torchrun --nproc_per_node N")
        torch_dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                      timeout=timeout)
    elif launcher == "mpirun" and backend != "smddp":
        raise UsageError(f"--backend {backend} under mpirun: start the ranks with torchrun (or srun + torchrun); "
                         "mpirun is supported for SageMaker's SMDDP only")
    elif launcher == "torchrun":
        store, rank, size = next(torch_dist.rendezvous("env://", timeout=timeout))
        # A torchrun restart re-forms the group in the same store: without a fresh prefix per attempt, a new
        # rank can read a dead rank's address from the attempt before and fail to connect.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        torch_dist.init_process_group(backend, store=torch_dist.PrefixStore(f"hpml/attempt_{attempt}/", store),
                                      rank=rank, world_size=size, timeout=timeout)
    else:
        torch_dist.init_process_group(backend, timeout=timeout)
    size = torch_dist.get_world_size()
    local_size = _env_int("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", default=size)
    return World(rank=torch_dist.get_rank(), local_rank=local_rank, size=size, nodes=max(1, size // local_size),
                 backend=backend, device=device, launcher=launcher, sagemaker=sagemaker_info())


def teardown() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- SageMaker -----------------------------------------------------------------------------------

SAGEMAKER_CHECKPOINT_DIR = "/opt/ml/checkpoints"


def in_sagemaker() -> bool:
    return "SM_TRAINING_ENV" in os.environ or "SM_HOSTS" in os.environ


def sagemaker_info() -> dict | None:
    """The job's name, instance type and count, from the environment SageMaker gives a training container."""
    if not in_sagemaker():
        return None
    training_env = json.loads(os.environ.get("SM_TRAINING_ENV") or "{}")
    hosts = json.loads(os.environ.get("SM_HOSTS") or "[]") or training_env.get("hosts", [])
    return {
        "job_name": os.environ.get("TRAINING_JOB_NAME") or training_env.get("job_name"),
        "instance_type": os.environ.get("SM_CURRENT_INSTANCE_TYPE") or training_env.get("current_instance_type"),
        "instance_count": len(hosts) or 1,
        "current_host": os.environ.get("SM_CURRENT_HOST") or training_env.get("current_host"),
        "gpus_per_host": _env_int("SM_NUM_GPUS", default=0),
    }

