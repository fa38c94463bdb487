"""A study's cells as SLURM batch jobs: one sbatch script per cell, in the conventions of slurm/hpml_ddp.sbatch
(srun starts one torchrun per node, torchrun one process per GPU, rendezvous on the first node).

Client layer: no torch. Written against sbatch's documented interface; not tested against a real SLURM.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from . import cli
from .config import TrainConfig
from .errors import UsageError
from .study import DATA_PARALLEL_SCRIPT, SINGLE_DEVICE_SCRIPT, Cell, settings_id

SUBMITTED = re.compile(r"Submitted batch job (\d+)")
TIME_LIMIT = re.compile(r"(\d+-)?\d+(:\d\d){0,2}")  # sbatch --time: minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]


def check_time_limit(text: str) -> str:
    if not TIME_LIMIT.fullmatch(text):
        raise UsageError(f"--time-limit must be a SLURM time such as 30, 45:00, 01:00:00 or 1-00:00:00, got {text!r}")
    return text


def nodes_and_gpus(world_size: int, gpus_per_node: int) -> tuple[int, int]:
    """(nodes, GPUs per node) for a world size: one node when it fits, else whole nodes; UsageError otherwise."""
    if world_size <= gpus_per_node:
        return 1, world_size
    if world_size % gpus_per_node:
        raise UsageError(f"--world-sizes {world_size} does not fill whole nodes of --gpus-per-node {gpus_per_node}; "
                         f"use a size up to {gpus_per_node} or a multiple of it")
    return world_size // gpus_per_node, gpus_per_node


def job_name(cell: Cell, cfg: TrainConfig) -> str:
    return f"hpml-{cell.model}-w{cell.world_size}-r{cell.repeat + 1}-{settings_id(cfg, cell)}"


def batch_script(cell: Cell, cfg: TrainConfig, gpus_per_node: int, time_limit: str, log_dir: Path) -> str:
    """The sbatch script of one cell: run_hpc.py on one GPU for world size 1, else torchrun on every node. It runs
    in the folder sbatch is called from, as relative --data-dir and --output-dir expect."""
    nodes, gpus = nodes_and_gpus(cell.world_size, gpus_per_node)
    distributed = cell.world_size > 1
    values = {**cli.flag_values(cfg, distributed), "model": cell.model}
    flags = " ".join(shlex.quote(text) for name, value in values.items() for text in (f"--{name}", value))
    python = shlex.quote(sys.executable)
    if distributed:
        launch = (f"srun --kill-on-bad-exit=1 {python} -m torch.distributed.run \\\n"
                  f"    --nnodes \"$SLURM_NNODES\" --nproc_per_node {gpus} --rdzv-id \"$SLURM_JOB_ID\" \\\n"
                  f"    --rdzv-backend c10d --rdzv-endpoint \"$RDZV_HOST:$RDZV_PORT\" \\\n"
                  f"    {shlex.quote(str(DATA_PARALLEL_SCRIPT))} {flags}")
        rendezvous = ('RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
                      "RDZV_PORT=${RDZV_PORT:-29500}\n")
    else:
        launch, rendezvous = f"srun {python} {shlex.quote(str(SINGLE_DEVICE_SCRIPT))} {flags}", ""
    return (f"#!/bin/bash\n"
            f"# {cell}: written by run_study.py --where slurm\n"
            f"#SBATCH --job-name={job_name(cell, cfg)}\n"
            f"#SBATCH --nodes={nodes}\n"
            f"#SBATCH --ntasks-per-node=1\n"
            f"#SBATCH --gpus-per-node={gpus}\n"
            f"#SBATCH --cpus-per-task={4 * gpus}\n"
            f"#SBATCH --time={time_limit}\n"
            f"#SBATCH --output={log_dir / job_name(cell, cfg)}-%j.out\n\n"
            f"set -euo pipefail\n"
            f"{rendezvous}"
            "# CPU threads per training process (one per GPU): the data sits on the GPU, so the CPU mostly launches "
            "kernels.\n"
            "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}\n\n"
            f"{launch}\n")


def submit(script: Path) -> str:
    """Submit a batch script with sbatch; the job id. UsageError with sbatch's message when it refuses."""
    try:
        done = subprocess.run(["sbatch", str(script)], capture_output=True, text=True)
    except FileNotFoundError:
        raise UsageError("--where slurm: no sbatch on PATH; run it on a SLURM login node") from None
    found = SUBMITTED.search(done.stdout)
    if done.returncode != 0 or not found:
        raise UsageError(f"sbatch {script} failed: {(done.stderr or done.stdout).strip() or done.returncode}")
    return found.group(1)
