"""A study's cells as SLURM batch jobs: one sbatch script per cell, in the conventions of slurm/hpml_ddp.sbatch
(srun starts one torchrun per node, torchrun one process per GPU, or the processes of a CPU node; the rendezvous
is on the first node, at a port of the job's own).

Client layer: no torch. Run against a real SLURM of two CPU nodes (tests/platforms/test_slurm_cluster.py), and against
stand-ins for its commands (tests/platforms/test_study_slurm.py).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hpml import cli, files, scripts
from hpml.config import MAX_PROCESSES, TrainConfig
from hpml.errors import UsageError
from hpml.study.matrix import Cell, settings_id

SUBMITTED = re.compile(r"Submitted batch job (\d+)")
TIME_LIMIT = re.compile(r"(\d+-)?\d+(:\d\d){0,2}")  # sbatch --time: minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]
# What the #SBATCH line of a name may hold (sbatch splits those lines at blanks and reads quotes its own way):
# partition (a comma list), account and QOS names; a constraint adds the operators of its expressions.
NAME = r"[A-Za-z0-9_.\-]+"
NAMES = {"partition": (re.compile(rf"{NAME}(,{NAME})*"), "a partition name or comma list of them"),
         "account": (re.compile(NAME), "an account name"), "qos": (re.compile(NAME), "a QOS name"),
         "constraint": (re.compile(r"[A-Za-z0-9_.\-&|,*:\[\]()]+"), "node features joined by &, |, [...], *count")}
NAME_CHARS = "letters, digits, '_', '-', '.'"
CPUS_PER_GPU = 4  # a job's CPUs per GPU unless --cpus-per-task says
MAX_CPUS = 4096  # --cpus-per-task: more than a node has, a typo
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
# A multi-node job's rendezvous, on its first node (two jobs there meet at the same port only when their ids are a
# multiple of 20000 apart); its log says where.
RENDEZVOUS = ('RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
              "# A rendezvous port of this job's own: jobs that share their first node do not meet at the same one.\n"
              "RDZV_PORT=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}\n"
              'echo "rendezvous at $RDZV_HOST:$RDZV_PORT"\n')


@dataclass
class JobOptions:
    """What every cell's job asks SLURM for, and runs before training: run_study.py's SLURM flags."""

    gpus_per_node: int = 4  # 0: CPU nodes
    processes_per_node: int | None = None  # None: one per GPU, or one per CPU node
    cpus_per_task: int | None = None  # None: CPUS_PER_GPU per GPU, or one per process on CPU nodes
    time_limit: str = "01:00:00"
    names: dict[str, str] = field(default_factory=dict)  # those of partition, account, qos, constraint given
    sbatch_args: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)  # shell lines, as given

    @property
    def per_node(self) -> int:
        """The training processes of a node, at most."""
        return self.processes_per_node or self.gpus_per_node or 1

    def check(self, world_sizes: list[int]) -> None:
        """UsageError in one line for the first flag SLURM or the script could not take (check_counts aside, which
        holds wherever the study runs)."""
        check_time_limit(self.time_limit)
        for flag, value in self.names.items():
            check_name(flag, value)
        for argument in self.sbatch_args:
            check_sbatch_arg(argument)
        check_setup(self.setup)
        for size in world_sizes:
            self.layout(size)

    def layout(self, world_size: int) -> tuple[int, int]:
        """(nodes, processes per node) for a world size: one node when it fits, else whole nodes."""
        if world_size <= self.per_node:
            return 1, world_size
        if world_size % self.per_node:
            given = (f"--processes-per-node {self.processes_per_node}" if self.processes_per_node
                     else f"--gpus-per-node {self.gpus_per_node}" if self.gpus_per_node
                     else "one process per CPU node (--processes-per-node)")
            raise UsageError(f"--world-sizes {world_size} does not fill whole nodes of {given}; use a size up to "
                             f"{self.per_node} or a multiple of it")
        return world_size // self.per_node, self.per_node

    def python(self) -> str:
        """The python a job runs: this one, unless --setup makes its own (then `python` on the PATH it leaves)."""
        return "python" if self.setup else shlex.quote(sys.executable)


def check_counts(options: JobOptions) -> None:
    """UsageError in one line for a count of GPUs, processes or CPUs that no node has."""
    if not 0 <= options.gpus_per_node <= MAX_PROCESSES:
        raise UsageError(f"--gpus-per-node must be 0 (CPU nodes) to {MAX_PROCESSES}, got {options.gpus_per_node}")
    processes = options.processes_per_node
    if processes is not None and not 1 <= processes <= MAX_PROCESSES:
        raise UsageError(f"--processes-per-node must be 1 to {MAX_PROCESSES}, got {processes}")
    if processes is not None and options.gpus_per_node and processes > options.gpus_per_node:
        raise UsageError(f"--processes-per-node {processes} is more than --gpus-per-node {options.gpus_per_node}: "
                         "each process has a GPU of its own (--gpus-per-node 0 for CPU nodes)")
    if options.cpus_per_task is not None and not 1 <= options.cpus_per_task <= MAX_CPUS:
        raise UsageError(f"--cpus-per-task must be 1 to {MAX_CPUS}, got {options.cpus_per_task}")


def check_time_limit(text: str) -> None:
    if not TIME_LIMIT.fullmatch(text):
        raise UsageError(f"--time-limit must be a SLURM time such as 30, 45:00, 01:00:00 or 1-00:00:00, got {text!r}")


def check_name(flag: str, value: str) -> None:
    pattern, what = NAMES[flag]
    if not pattern.fullmatch(value):
        allowed = NAME_CHARS + (", &, |, ',', *, :, [, ], (, )" if flag == "constraint" else "")
        raise UsageError(f"--{flag} must be {what} ({allowed}), got {value!r}")


def has_control_characters(text: str, allowed: str = "") -> bool:
    return any((ord(char) < 32 or ord(char) == 127) and char not in allowed for char in text)


def check_sbatch_arg(argument: str) -> None:
    """An option sbatch takes on its command line, in one argument (it would take another word for the script's
    name): --sbatch-arg=--mem=8G, not --sbatch-arg=--mem --sbatch-arg=8G."""
    if not argument.startswith("-") or has_control_characters(argument):
        raise UsageError(f"--sbatch-arg must be one sbatch option with its value, starting with '-' and without "
                         f"control characters (e.g. --sbatch-arg=--mem=8G), got {argument!r}")


def check_setup(lines: list[str]) -> None:
    """Shell lines bash can read: no control characters but newlines and tabs, and no syntax error (bash -n)."""
    for text in lines:
        if has_control_characters(text, allowed="\n\t"):
            raise UsageError(f"--setup must be shell lines without control characters other than newlines and "
                             f"tabs, got {text!r}")
    if lines:
        done = subprocess.run(["bash", "-n"], input="\n".join(lines) + "\n", capture_output=True, text=True)
        if done.returncode:
            why = " ".join(done.stderr.split()) or f"exit code {done.returncode}"
            raise UsageError(f"--setup must be lines bash can run: {why}, in {chr(10).join(lines)!r}")


def job_name(cell: Cell, cfg: TrainConfig) -> str:
    return f"hpml-{cell.model}-w{cell.world_size}-r{cell.repeat + 1}-{settings_id(cfg, cell)}"


def check_output_dir(output_dir: str) -> None:
    """UsageError for an --output-dir the jobs' log files cannot be named in: a newline or another control character
    (no printed sbatch command would fit on a line), or a backslash (sbatch's --output then leaves '%j' as it is)."""
    if "\\" in output_dir or has_control_characters(output_dir):
        raise UsageError(f"--where slurm: --output-dir must not contain a newline, another control character or a "
                         f"backslash (sbatch names the log files in it), got {output_dir!r}")


def log_file(log_dir: Path, cell: Cell, cfg: TrainConfig, job: str) -> Path:
    """Where the job writes its output."""
    return log_dir / f"{job_name(cell, cfg)}-{job}.out"


def sbatch_command(script: Path, log_dir: Path, cell: Cell, cfg: TrainConfig, sbatch_args: list[str]) -> list[str]:
    """sbatch with --sbatch-arg's options, then the job's log file, '%j' for the job id that sbatch puts in (last, so
    that the log is where a re-run looks for it). --output goes on the command line, not in an #SBATCH line, which
    sbatch splits and unquotes by rules of its own; '%' in the folder is doubled, as sbatch reads '%' in --output as
    the start of a pattern."""
    pattern = log_file(Path(str(log_dir).replace("%", "%%")), cell, cfg, "%j")
    return ["sbatch", *sbatch_args, f"--output={pattern}", str(script)]


def batch_script(cell: Cell, cfg: TrainConfig, options: JobOptions) -> str:
    """The sbatch script of one cell: run_hpc.py's module for world size 1, else torchrun on every node, both from
    this hpml package (first on PYTHONPATH). It runs in the folder sbatch is called from, as relative --data-dir and
    --output-dir expect."""
    nodes, processes = options.layout(cell.world_size)
    gpus = processes if options.gpus_per_node else 0
    cpus = options.cpus_per_task or (CPUS_PER_GPU * gpus or processes)
    requests = [f"--job-name={job_name(cell, cfg)}", f"--nodes={nodes}", "--ntasks-per-node=1",
                *([f"--gpus-per-node={gpus}"] if gpus else []), f"--cpus-per-task={cpus}",
                f"--time={options.time_limit}", *(f"--{flag}={value}" for flag, value in options.names.items())]
    return (f"#!/bin/bash\n"
            f"# {cell}: written by run_study.py --where slurm\n"
            + "".join(f"#SBATCH {request}\n" for request in requests)
            + f"\n{shell_start(options.setup)}"
            + f"# CPU threads per training process: its share of the node's CPUs ({cpus} for {processes})\n"
            + f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{max(1, cpus // processes)}}}\n"
            + "# The hpml package that wrote this script, a checkout or an installed one\n"
            + f"export PYTHONPATH={shlex.quote(str(scripts.IMPORT_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}\n\n"
            + f"{launch(cell, cfg, options.python(), processes)}\n")


def shell_start(setup: list[str]) -> str:
    """Stop at the first failing command; --setup's lines before `set -u`, which some of them (module, activate
    scripts) do not take."""
    if not setup:
        return "set -euo pipefail\n"
    lines = "\n".join(setup)
    return f"set -eo pipefail\n# --setup, as given; then `python` is the one on the PATH it leaves\n{lines}\nset -u\n"


def launch(cell: Cell, cfg: TrainConfig, python: str, processes: int) -> str:
    distributed = cell.world_size > 1
    values = {**cli.flag_values(cfg, distributed), "model": cell.model}
    flags = " ".join(shlex.quote(text) for name, value in values.items() for text in (f"--{name}", value))
    if not distributed:
        return f"srun {python} -m {scripts.SINGLE_DEVICE} {flags}"
    return (f"{RENDEZVOUS}"
            f"srun --kill-on-bad-exit=1 {python} -m torch.distributed.run \\\n"
            f"    --nnodes \"$SLURM_NNODES\" --nproc_per_node {processes} --rdzv-id \"$SLURM_JOB_ID\" \\\n"
            f"    --rdzv-backend c10d --rdzv-endpoint \"$RDZV_HOST:$RDZV_PORT\" \\\n"
            f"    -m {scripts.DATA_PARALLEL} {flags}")


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


JOB_ID = re.compile(r"[0-9]+(_[0-9]+)?")


def earlier_job(marker: Path) -> str:
    """The id of the job a cell was submitted as, from the marker this study wrote (`<job-name>.job`); UsageError
    when the file is no regular file of one job id (read without waiting on a FIFO, at most 64 bytes)."""
    how_to_resubmit = f"delete {files.shown(marker)} to submit the cell again"
    try:
        with files.open_regular(marker) as file:
            text = file.read(64).decode("utf-8", "replace").strip()
    except OSError as error:
        raise UsageError(f"cannot read {files.shown(marker)}: {error.strerror or error}; {how_to_resubmit}") from None
    if not JOB_ID.fullmatch(text):
        raise UsageError(f"{files.shown(marker)} must hold the SLURM job id this study wrote there, got {text!r}; "
                         f"{how_to_resubmit}")
    return text


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
