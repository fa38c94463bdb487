"""A real SLURM cluster of a controller and two compute nodes on this machine, for tests: Debian's slurmctld, slurmd
and munge, each host in namespaces of its own, all of it gone when the cluster stops.

Topology. Every host (`ctl`, `node1`, `node2`) is a host of tests/namespace_hosts.py: new network, UTS, mount and
PID namespaces of its own, its own hostname and hosts file, an eth0 on a bridge (10.231.0.1 for the controller,
.11 and .12 for the nodes), and it dies with the test process. A node's slurmd spool (Debian's /var/lib/slurm/slurmd)
is a tmpfs of its own, mounted in its mount namespace. munged (a key and socket of its own) and slurmctld run in
the controller's namespaces, a slurmd per node in the node's. No address, interface, mount or file outside the
cluster's folder is made, and clusters of other test processes can run at the same time with the same addresses.

Clients. The client commands run in the controller's network and UTS namespaces, as on a login node that is the
controller: `cluster.run(["sbatch", ...])`, or the wrapper scripts in `cluster.bin_dir` (sbatch, srun, squeue,
sacct, scontrol, scancel, sinfo, salloc) with `cluster.env` (PATH and SLURM_CONF), which code under test finds on
PATH. The file system is the machine's, shared by all hosts as a cluster's shared home would be: a job runs as
root in the folder it was submitted from, and can run this repository's .venv/bin/python on either node. In a job,
the wrappers run the real commands on the node itself.

Signals: `scancel` sends SIGTERM to every process of a job's steps, and SIGKILL KillWait (30 s) later to those left,
time enough for a training run to save its checkpoint.

Accounting: none (`sacct` says "Slurm accounting storage is disabled"); `scontrol show job` and `squeue --states=all`
know a job for MinJobAge (300 s) after it ends, and jobcomp/filetxt writes a line per ended job to `jobcomp.txt`.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import time
from pathlib import Path

from tests import namespace_hosts

PACKAGES = "slurmctld slurmd slurm-client munge"
CLIENTS = ("sbatch", "srun", "salloc", "squeue", "sacct", "scontrol", "scancel", "sinfo")
SUBNET = "10.231.0"
CONTROLLER = "ctl"
# Each node's SlurmdSpoolDir, Debian's: a tmpfs of the node's own, mounted in its mount namespace only.
SPOOL = "/var/lib/slurm/slurmd"
# A job's end states, as scontrol shows them; anything else is still on its way.
ACTIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
                    "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT"})


class ClusterError(namespace_hosts.HostsError):
    """The cluster could not start, or a command on it failed."""


def sbin(tool: str) -> str:
    found = namespace_hosts.which(tool)
    if not found:
        raise ClusterError(f"no {tool}: apt-get install {PACKAGES}")
    return found


def missing() -> str | None:
    """Why this machine cannot run a cluster, in words; None when it can."""
    why = namespace_hosts.missing()
    if why:
        return why
    tools = [tool for tool in ("slurmctld", "slurmd", "sbatch", "munged") if not namespace_hosts.which(tool)]
    if tools:
        return f"no {', '.join(tools)}: apt-get install {PACKAGES}"
    return None


class SlurmCluster(namespace_hosts.StartedInWith):
    """`with SlurmCluster(folder) as cluster:` a controller and `nodes` compute nodes, each `cpus` CPUs (more than
    the machine has is fine: SlurmdParameters=config_overrides; nothing binds a task to a CPU) and `gpus` GPUs in
    name only, so that jobs asking for --gpus-per-node are taken (GRES gpu on copies of /dev/null; SLURM sets
    CUDA_VISIBLE_DEVICES=0,1,... in their steps as for real GPUs)."""

    def __init__(self, folder: Path, nodes: int = 2, cpus: int = 2, gpus: int = 0, start_timeout: float = 30):
        self.folder = Path(folder)
        self.nodes = [f"node{index}" for index in range(1, nodes + 1)]
        self.cpus, self.gpus, self.start_timeout = cpus, gpus, start_timeout
        self.conf = self.folder / "slurm.conf"
        self.bin_dir = self.folder / "bin"
        self.log_dir = self.folder / "log"
        self.munge_socket = self.folder / "munge" / "socket"
        self.addresses = {CONTROLLER: f"{SUBNET}.1",
                          **{node: f"{SUBNET}.{10 + index}" for index, node in enumerate(self.nodes, 1)}}
        # Each node's own spool, as short a path as slurmstepd's sockets in it need.
        self.hosts = namespace_hosts.Hosts(
            self.folder, self.addresses, start_timeout=start_timeout,
            setup={node: f"mount -t tmpfs -o mode=755,size=64m {node}-spool {SPOOL}" for node in self.nodes})
        self.daemons: dict[str, subprocess.Popen] = {}  # name: its nsenter
        self.start_seconds = 0.0

    # -- the environment code under test gets

    @property
    def env(self) -> dict[str, str]:
        """os.environ with the wrappers first on PATH and SLURM_CONF set."""
        return {**os.environ, "PATH": f"{self.bin_dir}:{os.environ.get('PATH', '')}", "SLURM_CONF": str(self.conf)}

    def run(self, argv: list[str], timeout: float = 60, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """A client command (sbatch, srun, squeue, ...) on the controller; ClusterError when `check` and it fails."""
        kwargs.setdefault("cwd", self.folder)
        done = subprocess.run([str(self.bin_dir / argv[0]), *argv[1:]], env=self.env, capture_output=True,
                              text=True, timeout=timeout, **kwargs)
        if check and done.returncode:
            raise ClusterError(f"{' '.join(argv)} exited with {done.returncode}: {done.stderr.strip()}")
        return done

    def sbatch(self, *args: str, **kwargs) -> str:
        """Submit a job; its id."""
        return self.run(["sbatch", "--parsable", *args], **kwargs).stdout.strip().split(";")[0]

    def job_state(self, job: str) -> str:
        """The job's state as the controller knows it (PENDING, RUNNING, COMPLETED, CANCELLED, ...)."""
        shown = self.run(["scontrol", "show", "job", "--oneliner", job]).stdout
        found = re.search(r"\bJobState=([A-Z_]+)", shown)
        if not found:
            raise ClusterError(f"scontrol show job {job}: no JobState in {shown!r}")
        return found.group(1)

    def wait_job(self, job: str, timeout: float = 60) -> str:
        """Wait until the job has ended; its final state (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...)."""
        deadline = time.monotonic() + timeout
        while (state := self.job_state(job)) in ACTIVE:
            if time.monotonic() > deadline:
                raise ClusterError(f"job {job} still {state} after {timeout} s\n{self.logs()}")
            time.sleep(0.1)
        return state

    def node_states(self) -> dict[str, str]:
        """Each node's state as sinfo shows it (idle, alloc, mix, down*, ...)."""
        shown = self.run(["sinfo", "--noheader", "--Node", "--format=%N %t"], check=False).stdout
        return dict(line.split() for line in shown.splitlines() if len(line.split()) == 2)

    def in_host(self, host: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """A command in all the namespaces of one host of the cluster (ctl, node1, ...)."""
        return subprocess.run(self.nsenter(host) + argv, capture_output=True, text=True, timeout=30, **kwargs)

    def logs(self) -> str:
        """The daemons' logs, last lines: for a failure's message."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # -- start and stop

    def start(self) -> None:
        started = time.monotonic()
        try:
            self.write_files()
            self.hosts.start()
            self.write_wrappers()
            munge = self.folder / "munge"
            self.daemon(CONTROLLER, "munged", sbin("munged"), "--foreground", "--force",
                        f"--socket={self.munge_socket}", f"--key-file={munge / 'key'}", f"--pid-file={munge / 'pid'}",
                        f"--seed-file={munge / 'seed'}", f"--log-file={self.log_dir / 'munged.log'}")
            self.wait_for(self.munge_socket.exists, "munged's socket")
            self.daemon(CONTROLLER, "slurmctld", sbin("slurmctld"), "-D", "-i")
            for node in self.nodes:
                self.daemon(node, f"slurmd-{node}", sbin("slurmd"), "-D", "-N", node)
            self.wait_for(self.all_idle, "every node idle in sinfo")
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started

    def all_idle(self) -> bool:
        states = self.node_states()
        refused = {node: state for node, state in states.items() if state.startswith(("inval", "drain"))}
        if refused:  # the controller refused a node's registration: it says why in its log
            raise ClusterError(f"SLURM cluster: nodes {refused}\n{self.logs()}")
        return all(states.get(node) == "idle" for node in self.nodes)

    def wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not condition():
            ended = [name for name, daemon in self.daemons.items() if daemon.poll() is not None]
            if ended or time.monotonic() > deadline:
                why = f"{ended[0]} exited" if ended else f"not after {self.start_timeout} s"
                raise ClusterError(f"SLURM cluster: waiting for {what}: {why}\n{self.logs()}")
            time.sleep(0.05)

    def write_files(self) -> None:
        for folder in ("munge", "state", "log", "bin"):
            (self.folder / folder).mkdir(parents=True, exist_ok=True)
        (self.folder / "munge").chmod(0o700)
        if len(str(self.munge_socket).encode()) > 100:  # a Unix socket's path has at most 107 bytes
            raise ClusterError(f"SLURM cluster: the folder's path is too long for munged's socket: {self.munge_socket}")
        if not Path(SPOOL).is_dir():
            raise ClusterError(f"SLURM cluster: no {SPOOL} to mount the nodes' spool on (apt-get install slurmd)")
        key = self.folder / "munge" / "key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        nodes = f"node[1-{len(self.nodes)}]"
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        self.conf.write_text(f"""\
# A test cluster: tests/slurm_cluster.py
ClusterName=hpmltest
SlurmctldHost={CONTROLLER}({self.addresses[CONTROLLER]})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.folder / 'jobcomp.txt'}
StateSaveLocation={self.folder / 'state'}
SlurmdSpoolDir={SPOOL}
SlurmctldPidFile={self.folder / 'slurmctld.pid'}
SlurmdPidFile={SPOOL}/slurmd.pid
SlurmctldLogFile={self.log_dir / 'slurmctld.log'}
SlurmdLogFile={self.log_dir / 'slurmd'}-%n.log
SlurmctldDebug=info
SlurmdDebug=info
KillWait=30
MinJobAge=300
InactiveLimit=0
MailProg=/bin/true
SchedulerParameters=batch_sched_delay=0
{"GresTypes=gpu" if self.gpus else ""}
NodeName={nodes} NodeAddr={SUBNET}.[11-{10 + len(self.nodes)}] CPUs={self.cpus} RealMemory=1000{gres} State=UNKNOWN
PartitionName=debug Nodes={nodes} Default=YES MaxTime=INFINITE State=UP
""")
        if self.gpus:  # slurmd drops GPUs without character devices: copies of /dev/null stand in
            (self.folder / "dev").mkdir(exist_ok=True)
            for index in range(self.gpus):
                os.mknod(self.folder / "dev" / f"gpu{index}", 0o666 | stat.S_IFCHR, os.stat("/dev/null").st_rdev)
            devices = f"{self.folder / 'dev'}/gpu[0-{self.gpus - 1}]"
            (self.folder / "gres.conf").write_text(f"NodeName={nodes} Name=gpu File={devices}\n")

    def write_wrappers(self) -> None:
        """Scripts that run a client command in the controller's network and UTS namespaces when called from this
        machine's own network namespace, and the command itself anywhere else (in a job on a node)."""
        here = os.readlink("/proc/self/ns/net")
        ctl = self.hosts.pids[CONTROLLER]
        ctl_net = os.readlink(f"/proc/{ctl}/ns/net")
        for client in CLIENTS:
            path = self.bin_dir / client
            path.write_text(f"""#!/bin/sh
# {client} on the SLURM test cluster in {self.folder} (tests/slurm_cluster.py)
export SLURM_CONF='{self.conf}'
if [ "$(readlink /proc/self/ns/net)" != '{here}' ]; then exec {sbin(client)} "$@"; fi
if [ "$(readlink /proc/{ctl}/ns/net 2>/dev/null)" != '{ctl_net}' ]; then
    echo "{client}: the SLURM test cluster in {self.folder} is not running" >&2; exit 1
fi
exec {sbin("nsenter")} --target {ctl} --net --uts -- {sbin(client)} "$@"
""")
            path.chmod(0o755)

    def nsenter(self, host: str) -> list[str]:
        """The command line prefix that runs a command in all the namespaces of `host`."""
        return self.hosts.nsenter(host)

    def daemon(self, host: str, name: str, *argv: str) -> None:
        with open(self.log_dir / f"{name}.out", "w") as log:
            self.daemons[name] = subprocess.Popen([*self.nsenter(host), *argv], stdin=subprocess.DEVNULL, stdout=log,
                                                  stderr=subprocess.STDOUT,
                                                  env={**os.environ, "SLURM_CONF": str(self.conf)})

    def stop(self) -> None:
        """Stop the hosts, and with them every process of the cluster."""
        self.hosts.stop()
        for daemon in self.daemons.values():
            if daemon.poll() is None:
                daemon.kill()  # an nsenter left waiting
            daemon.wait(timeout=30)
        if self.bin_dir.exists():
            for wrapper in self.bin_dir.iterdir():
                wrapper.unlink()
