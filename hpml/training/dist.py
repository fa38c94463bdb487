"""The world a run trains in: one process, or a torch.distributed group started by torchrun, SLURM or SageMaker."""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from hpml import config
from hpml.config import MAX_PROCESSES, MAX_WORLD_SIZE, TrainConfig
from hpml.errors import RunStopped, UsageError, one_line


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

    @property
    def mode(self) -> str:
        """"distributed" in a process group, else "single": run ids, checkpoint folders and records say which."""
        return "distributed" if self.distributed else "single"

    def describe(self) -> dict:
        """The world's fields of a results record."""
        fields = {"mode": self.mode, "backend": self.backend, "world_size": self.size, "nodes": self.nodes,
                  "launcher": self.launcher, "device": self.device.type}
        return {**fields, "sagemaker": self.sagemaker} if self.sagemaker else fields

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Reduce a few numbers over all ranks (sum or max); the identity in a world of one.

        Only all-reduce (sum) and all-gather, the collectives every backend has, SMDDP's included.
        """
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.reduce_device)
        if op == "sum":
            torch_dist.all_reduce(tensor)
            return tensor.tolist()
        gathered = [torch.empty_like(tensor) for _ in range(self.size)]
        torch_dist.all_gather(gathered, tensor)
        return torch.stack(gathered).amax(0).tolist()

    def gather_lists(self, items: list) -> list:
        """Every rank's list, concatenated in rank order (on every rank); the list itself in a world of one."""
        if not self.distributed:
            return list(items)
        gathered: list[list | None] = [None] * self.size
        torch_dist.all_gather_object(gathered, items)
        return [item for rank_items in gathered for item in rank_items]

    def barrier(self) -> None:
        """Wait for every rank (an all-reduce of nothing, so that it needs no collective beyond all_reduce)."""
        self.all_reduce([0.0])

    @property
    def reduce_device(self) -> torch.device:
        return torch.device("cpu") if self.backend == "gloo" else self.device


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """auto -> this rank's CUDA device when there is one, else the CPU; cuda without CUDA is a UsageError."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise UsageError("--device cuda: no CUDA device is available here"
                         + (f" (CUDA_VISIBLE_DEVICES is {hidden!r})" if hidden is not None else "")
                         + "; use --device cpu or --device auto")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise UsageError(f"local rank {local_rank} needs GPU {local_rank}, but this node has {count}; "
                         f"start at most {count} processes per node")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def single_process(device: str, log: Callable[[str], None] = print) -> World:
    """A world of one process on the chosen device, with no process group."""
    world = World(rank=0, local_rank=0, size=1, nodes=1, backend=None, device=resolve_device(device),
                  sagemaker=config.job_info())
    gpus = config.gpus_per_host()
    if world.sagemaker and world.device.type == "cuda" and gpus > 1:
        log(f"this instance has {gpus} GPUs; a single-device run trains on one of them (GPU {world.device.index})")
    return world


# ---- torch.distributed ---------------------------------------------------------------------------

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
MAX_PORT = 65_535


def launcher_from_env() -> str:
    """Which launcher started this process: SageMaker's SMDDP launcher (smddprun), torchrun (or anything setting
    WORLD_SIZE), another mpirun, or none."""
    if config.smddp_launched():
        return "smddprun"
    if "WORLD_SIZE" in os.environ:
        return "torchrun"
    if "OMPI_COMM_WORLD_SIZE" in os.environ:
        return "mpirun"
    return "none"


def _env_int(*names: str, default: int | None, most: int | None = None) -> int | None:
    """The first of these variables that is set, as an integer 0 or more (at most `most`); UsageError naming it when
    it is empty, not such an integer, or above `most`."""
    for name in filter(os.environ.__contains__, names):
        text = os.environ[name].strip()
        if not (text.isascii() and text.isdigit()):
            raise UsageError(f"environment variable {name} must be an integer 0 or more, got {os.environ[name]!r}")
        if most is not None and int(text) > most:
            raise UsageError(f"environment variable {name} must be at most {most}, got {text}")
        return int(text)
    return default


def check_torchrun_env() -> None:
    """What env:// needs from torchrun (or whatever set WORLD_SIZE), named when it is missing or malformed: refused
    here, before a rendezvous that would wait --dist-timeout for it."""
    size = _env_int("WORLD_SIZE", default=1, most=MAX_WORLD_SIZE)
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise UsageError(f"WORLD_SIZE is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
                         "start the ranks with torchrun, which sets them all, or unset WORLD_SIZE to train alone")
    if _env_int("RANK", default=0) >= size:
        raise UsageError(f"environment variable RANK {os.environ['RANK']} must be below WORLD_SIZE {size}")
    port = _env_int("MASTER_PORT", default=0, most=MAX_PORT)
    if port == 0:
        raise UsageError("environment variable MASTER_PORT must be a port from 1 to 65535, got 0")
    address = os.environ["MASTER_ADDR"]
    if not (address and address.isascii() and address.isprintable() and " " not in address):
        raise UsageError(f"environment variable MASTER_ADDR must be a host name or address, got {address!r}")


def local_world() -> tuple[int, int | None]:
    """(this process's rank on its node, the processes on its node or None where the launcher does not say), from
    torchrun's variables or mpirun's; UsageError naming a malformed one."""
    rank = _env_int("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", default=0, most=MAX_PROCESSES - 1)
    size = _env_int("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", default=None, most=MAX_PROCESSES)
    if size is not None and not rank < size:
        raise UsageError(f"environment variable LOCAL_RANK {rank} must be below LOCAL_WORLD_SIZE {size}")
    return rank, size


def restart_count() -> int:
    """How many times torchrun has restarted the ranks (TORCHELASTIC_RESTART_COUNT; 0 when unset); UsageError naming
    it when it is no count."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", default=0)


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
    """The backend to use; UsageError when the requested one cannot work here.

    A SageMaker job submitted for SMDDP (or started by its launcher) uses smddp or fails: never another backend.
    """
    smddp_job = config.smddp_submitted() or launcher == "smddprun"
    if requested == "auto":
        requested = "smddp" if smddp_job else "nccl" if device.type == "cuda" else "gloo"
    elif smddp_job and requested != "smddp":
        raise UsageError(f"--backend {requested}: this SageMaker job was submitted for SMDDP (--distribution smddp), "
                         "which trains with the smddp backend only; use --backend auto or smddp")
    if requested == "smddp":
        asked = "this SageMaker job was submitted for SMDDP, but" if smddp_job else "--backend smddp:"
        if not smddp_available():
            raise UsageError(f"{asked} the SMDDP library (smdistributed.dataparallel) is not installed here; it "
                             "exists only in SageMaker's GPU training containers"
                             + ("" if smddp_job else "; use --backend auto, nccl or gloo"))
        supported = getattr(torch_dist.Backend, "backend_capability", {}).get("smddp", ["cuda"])
        if device.type not in supported:
            raise UsageError(f"{asked} SMDDP needs CUDA GPUs, and this process has device {device.type}"
                             + ("" if smddp_job else "; use --backend gloo on the CPU"))
    if requested == "nccl" and (device.type != "cuda" or not torch_dist.is_nccl_available()):
        raise UsageError("--backend nccl needs CUDA GPUs and a torch built with NCCL; "
                         "use --backend gloo (CPU) or --backend auto")
    if requested == "gloo" and not torch_dist.is_gloo_available():
        raise UsageError("--backend gloo: this torch was built without gloo; use --backend nccl on GPUs")
    return requested


def setup(cfg: TrainConfig, log: Callable[[str], None] = print) -> World:
    """Join the process group the launcher set up, or form a world of one when there is no launcher."""
    launcher = launcher_from_env()
    if launcher == "torchrun":
        check_torchrun_env()
    local_rank, local_size = local_world()
    restart_count()  # refused now, not once the group has formed
    device = resolve_device(cfg.device, local_rank)
    backend = choose_backend(cfg.backend, device, launcher)
    joining = (f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}: the group did not form "
               f"within --dist-timeout {cfg.dist_timeout:g} s")
    with ranks_lost_in_one_line(joining, every_dist_error=True):
        join_group(backend, launcher, timedelta(seconds=cfg.dist_timeout), log)
    size = torch_dist.get_world_size()
    nodes = max(1, size // (local_size or size))
    return World(rank=torch_dist.get_rank(), local_rank=local_rank, size=size, nodes=nodes,
                 backend=torch_dist.get_backend(), device=device, launcher=launcher, sagemaker=config.job_info())


def join_group(backend: str, launcher: str, timeout: timedelta, log: Callable[[str], None]) -> None:
    """init_process_group, as each launcher needs it."""
    if backend == "smddp":  # the SMDDP library finds its ranks itself, under its own launcher or torchrun
        torch_dist.init_process_group(backend, timeout=timeout)
    elif launcher == "torchrun":
        store, rank, size = next(torch_dist.rendezvous("env://", timeout=timeout))
        # A torchrun restart re-forms the group in the same store: without a fresh prefix per attempt, a new
        # rank can read a dead rank's address from the attempt before and fail to connect.
        attempt = restart_count()
        torch_dist.init_process_group(backend, store=torch_dist.PrefixStore(f"hpml/attempt_{attempt}/", store),
                                      rank=rank, world_size=size, timeout=timeout)
    elif launcher == "none":
        log("run_distributed.py: no launcher: training as a world of one process"
            + ("" if config.in_job() else " (WORLD_SIZE is unset); start several with torchrun --nproc_per_node N"))
        torch_dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                      timeout=timeout)
    else:
        raise UsageError(f"--backend {backend} under {launcher}: start the ranks with torchrun (or srun + torchrun); "
                         "mpirun is for SageMaker's SMDDP only")


# How torch.distributed says a rank went away or stopped answering: gloo's and NCCL's words, in lower case.
LOST_RANK_SIGNS = ("closed by peer", "reset by peer", "broken pipe", "timed out", "remote process exited")


@contextmanager
def ranks_lost_in_one_line(what_happened: str, every_dist_error: bool = False) -> Iterator[None]:
    """A rank that never came or went away (a timed-out rendezvous or collective, a peer's closed connection) as
    one RunStopped line starting with `what_happened`, not this rank's traceback: the cause, if there is one, is
    the error the other rank printed. With `every_dist_error`, any torch.distributed error counts (joining)."""
    try:
        yield
    except RuntimeError as error:
        text = one_line(error, 300)
        joining_failed = every_dist_error and isinstance(error, getattr(torch_dist, "DistError", ()))
        if not joining_failed and not any(sign in text.lower() for sign in LOST_RANK_SIGNS):
            raise
        raise RunStopped(f"{what_happened} ({type(error).__name__}: {text})", exit_code=1) from None


def register_grad_compression(ddp: torch.nn.parallel.DistributedDataParallel, compression: str, seed: int) -> None:
    """--grad-compression through PyTorch's DDP communication hooks; none keeps DDP's own fp32 all-reduce."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if compression == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif compression == "bf16":
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif compression == "powersgd":  # error feedback needs the first two steps to be plain all-reduces
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=2,
                                            random_seed=seed)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)


def teardown() -> None:
    """Leave the process group, first freeing what still holds it: a DDP model outlives training in reference
    cycles (torch keeps the frames that built it), and a gloo group it keeps until interpreter shutdown can abort
    the process there ('terminate called without an active exception')."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        gc.collect()
        torch_dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
