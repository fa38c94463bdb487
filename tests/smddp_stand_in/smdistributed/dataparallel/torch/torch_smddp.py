"""Test-only stand-in for SageMaker's SMDDP library, which exists only in SageMaker's GPU training containers.

tests/platforms/test_container.py puts the folder above `smdistributed` on the job's PYTHONPATH. Importing this module
does what importing the real `smdistributed.dataparallel.torch.torch_smddp` does for a training script: it
registers a torch.distributed backend named "smddp". Underneath it is gloo, on the CPU.

The real library runs under the toolkit's `mpirun ... smddprun python -m mpi4py <script>` and works with
`init_process_group("smddp")` and no init_method, that is the env:// rendezvous: MASTER_ADDR and MASTER_PORT come
from SageMaker's PyTorch toolkit (algo-1:7777), the rank and world size from MPI. The toolkit does not export
RANK or WORLD_SIZE to the ranks, so this stand-in sets them from Open MPI's variables when they are unset.
"""

import os
from datetime import timedelta

import torch.distributed as dist

for name, mpi_name in (("RANK", "OMPI_COMM_WORLD_RANK"), ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"),
                       ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),
                       ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")):
    if mpi_name in os.environ:
        os.environ.setdefault(name, os.environ[mpi_name])


def _gloo(store: dist.Store, rank: int, size: int, timeout: timedelta) -> dist.ProcessGroup:
    return dist.ProcessGroupGloo(store, rank, size, timeout)


if "smddp" not in dist.Backend.backend_list:
    dist.Backend.register_backend("smddp", _gloo, devices=["cpu"])
