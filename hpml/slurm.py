"""A study's cells as SLURM batch jobs: one sbatch script per cell, in the conventions of slurm/hpml_ddp.sbatch
(srun starts one torchrun per node, torchrun one process per GPU, rendezvous on the first node).

Client layer: no torch. Written against the documented interfaces of sbatch, sacct, squeue and scontrol; not
tested against a real SLURM.
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
# The end states of a job that did not finish its work: its cell is submitted again.
FAILED = frozenset({"BOOT_FAIL", "CANCELLED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                    "TIMEOUT"})
# Where a job's state is asked for, in order: the accounting database keeps every job (sacct's default start time
# is the epoch when --jobs is given); the controller only those pending, running or ended within MinJobAge.
# sacct prints e.g. "CANCELLED by 1000", squeue "RUNNING", scontrol "... JobState=FAILED Reason=...".
FIRST_WORD = re.compile(r"^([A-Z_]+)")
STATE_QUERIES = (
    (("sacct", "--jobs={job}", "--allocations", "--noheader", "--parsable2", "--format=State"), FIRST_WORD),
    (("squeue", "--noheader", "--jobs={job}", "--states=all", "--format=%T"), FIRST_WORD),
    (("scontrol", "show", "job", "{job}"), re.compile(r"\bJobState=([A-Z_]+)")),
)
QUERY_TIMEOUT_S = 60


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


def check_output_dir(output_dir: str) -> None:
    """UsageError for an --output-dir the jobs' log files cannot be named in: a newline or another control character
    (no printed sbatch command would fit on a line), or a backslash (sbatch's --output then leaves '%j' as it is)."""
    if "\\" in output_dir or any(ord(char) < 32 or ord(char) == 127 for char in output_dir):
        raise UsageError(f"--where slurm: --output-dir must not contain a newline, another control character or a "
                         f"backslash (sbatch names the log files in it), got {output_dir!r}")


def log_file(log_dir: Path, cell: Cell, cfg: TrainConfig, job: str) -> Path:
    """Where the job writes its output."""
    return log_dir / f"{job_name(cell, cfg)}-{job}.out"


def sbatch_command(script: Path, log_dir: Path, cell: Cell, cfg: TrainConfig) -> list[str]:
    """sbatch with the job's log file, '%j' for the job id that sbatch puts in. --output goes on the command line, not
    in an #SBATCH line, which sbatch splits and unquotes by rules of its own; '%' in the folder is doubled, as sbatch
    reads '%' in --output as the start of a pattern."""
    pattern = log_file(Path(str(log_dir).replace("%", "%%")), cell, cfg, "%j")
    return ["sbatch", f"--output={pattern}", str(script)]


def batch_script(cell: Cell, cfg: TrainConfig, gpus_per_node: int, time_limit: str) -> str:
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
            f"#SBATCH --time={time_limit}\n\n"
            f"set -euo pipefail\n"
            f"{rendezvous}"
            "# CPU threads per training process (one per GPU): the data sits on the GPU, so the CPU mostly launches "
            "kernels.\n"
            "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}\n\n"
            f"{launch}\n")


def submit(command: list[str]) -> str:
    """Submit a batch script with its sbatch_command; the job id. UsageError with sbatch's message when it refuses."""
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError:
        raise UsageError("--where slurm: no sbatch on PATH; run it on a SLURM login node") from None
    found = SUBMITTED.search(done.stdout)
    if done.returncode != 0 or not found:
        raise UsageError(f"{shlex.join(command)} failed: {(done.stderr or done.stdout).strip() or done.returncode}")
    return found.group(1)


def job_state(job: str) -> str | None:
    """The state of a job, from sacct, else squeue, else scontrol: the first that knows it (PENDING, RUNNING,
    COMPLETED, FAILED, ...); None when none does, or none is installed, or `job` is no job id."""
    if not job.isdecimal():
        return None
    for command, state in STATE_QUERIES:
        found = state.search(query([part.format(job=job) for part in command]))
        if found:
            return found.group(1)
    return None


def query(command: list[str]) -> str:
    """A SLURM command's output; empty when it is missing, fails (accounting disabled, unknown job) or hangs."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def submit_again(job: str, log: Path, marker: Path) -> tuple[bool, str]:
    """Whether a cell without results whose earlier job is `job` (its output in `log`, its id in `marker`) is to be
    submitted again, and why in words: yes when the job failed or SLURM no longer knows it; no while it is still in
    SLURM, or when it COMPLETED."""
    state = job_state(job)
    if state is None:
        return True, f"job {job} is unknown to sacct, squeue and scontrol (it ended long ago?), submitting again"
    if state in FAILED:
        return True, f"job {job} {state}, submitting again"
    if state == "COMPLETED":
        # It ran to the end yet its results are not in the output folder: it wrote them where this machine does not
        # see them (node-local disk, another working directory), they have not reached a shared file system yet, or
        # they were deleted. Another run would most likely spend the same GPU hours for nothing, so it is left to
        # the user.
        return False, (f"job {job} COMPLETED but its results are not in --output-dir (see {log}); not again, as it "
                       f"would most likely end the same way (delete {marker} to resubmit it)")
    return False, f"job {job} is {state}, not again (--force to resubmit)"
