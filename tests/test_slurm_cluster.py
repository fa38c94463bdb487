"""The SLURM test cluster (tests/slurm_cluster.py): a controller and two nodes, each a host in namespaces of its own,
that run real batch jobs and steps, and leave nothing behind on this machine. All of its tests are in this file, so
that pytest-xdist's --dist loadfile starts one cluster (the session fixture) on one worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.slurm_cluster import SPOOL, SUBNET, ClusterError, SlurmCluster


def output_of(cluster: SlurmCluster, job: str, path: Path) -> str:
    assert cluster.wait_job(job) == "COMPLETED", path.read_text() if path.exists() else cluster.logs()
    return path.read_text()


def test_both_nodes_come_up_idle_at_their_addresses(slurm_cluster):
    assert slurm_cluster.node_states() == {"node1": "idle", "node2": "idle"}
    print(f"cluster started in {slurm_cluster.start_seconds:.2f} s")
    assert slurm_cluster.start_seconds < 10
    shown = slurm_cluster.run(["scontrol", "show", "node", "node2"]).stdout
    assert f"NodeAddr={SUBNET}.12" in shown and "CPUTot=2" in shown


@pytest.mark.parametrize("node", ["node1", "node2"])
def test_a_batch_job_runs_on_the_node_it_asks_for_with_the_shared_files_and_venv(node, slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    python = f"{sys.executable} -c 'import socket, sys; print(socket.gethostname(), sys.prefix)'"
    job = slurm_cluster.sbatch("-w", node, f"--output={out}", "--wrap", f"hostname; {python}", cwd=tmp_path)
    assert output_of(slurm_cluster, job, out).split() == [node, node, sys.prefix]


def test_a_two_node_job_runs_a_task_on_each_node(slurm_cluster, tmp_path):
    done = slurm_cluster.run(["srun", "--nodes=2", "hostname"])  # a step of its own, from the controller
    assert sorted(done.stdout.split()) == ["node1", "node2"]
    # In a batch job, srun is the wrapper on PATH, which runs the real srun on node1, to which node2's slurmd
    # connects; the nodes also find each other by name (the hosts file of their namespaces).
    out = tmp_path / "job.out"
    job = slurm_cluster.sbatch("--nodes=2", f"--output={out}", "--wrap", "srun hostname | sort; getent hosts node2",
                               cwd=tmp_path)
    assert output_of(slurm_cluster, job, out).split() == ["node1", "node2", f"{SUBNET}.12", "node2"]


def test_a_cancelled_job_ends_cancelled_in_scontrol_squeue_and_the_completion_log(slurm_cluster):
    job = slurm_cluster.sbatch("--wrap", "sleep 300")
    deadline = time.monotonic() + 30
    while slurm_cluster.job_state(job) != "RUNNING":
        assert time.monotonic() < deadline, slurm_cluster.logs()
        time.sleep(0.1)
    slurm_cluster.run(["scancel", job])
    assert slurm_cluster.wait_job(job, timeout=30) == "CANCELLED"
    squeue = slurm_cluster.run(["squeue", "--noheader", f"--jobs={job}", "--states=all", "--format=%T"])
    assert squeue.stdout.split() == ["CANCELLED"]
    # No accounting database: sacct refuses, as on a cluster without slurmdbd; its -c reads jobcomp/filetxt.
    sacct = slurm_cluster.run(["sacct", f"--jobs={job}", "--noheader", "--parsable2", "--format=State"], check=False)
    assert sacct.returncode != 0 and "accounting storage is disabled" in sacct.stderr
    sacct = slurm_cluster.run(["sacct", "-c", f"--jobs={job}", "--noheader", "--parsable2", "--format=State"])
    assert sacct.stdout.split() == ["CANCELLED"]


def host_addresses() -> str:
    return subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout


def test_the_addresses_and_hosts_file_exist_only_inside_the_clusters_namespaces(slurm_cluster):
    assert f"{SUBNET}." not in host_addresses()
    assert " br0" not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "node1" not in Path("/etc/hosts").read_text()
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(slurm_cluster.folder) not in mounts and f" {SPOOL} " not in mounts
    node = slurm_cluster.in_host("node1", ["sh", "-c", f"hostname; ip -o addr; cat /etc/hosts; stat -fc%T {SPOOL}"])
    assert node.stdout.startswith("node1\n") and f"{SUBNET}.11/24" in node.stdout
    assert f"{SUBNET}.12 node2" in node.stdout and node.stdout.endswith("\ntmpfs\n")
    assert f"{SUBNET}.1/24" in slurm_cluster.in_host("ctl", ["ip", "-o", "addr"]).stdout


def traces(cluster: SlurmCluster) -> dict[str, list]:
    """What a running cluster has on this machine: its namespaces (net and mount, by inode), the processes in them,
    and the processes that started them (setpriv-unshare and nsenter), each with its command line."""
    spaces = [os.readlink(f"/proc/{pid}/ns/{kind}") for pid in cluster.pids.values() for kind in ("net", "mnt")]
    starters = [*cluster.holders.values(), *cluster.daemons.values()]
    return {"spaces": spaces, "processes": in_namespaces(spaces),
            "starters": [(process.pid, command_line(process.pid)) for process in starters]}


def command_line(pid: int) -> str | None:
    """A process's command line, "zombie" for one that has ended but is not waited for, None when there is none."""
    try:
        if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
            return "zombie"
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return None


def in_namespaces(spaces: list[str]) -> list[int]:
    """The processes in any of these namespaces."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdecimal():
            try:
                if any(os.readlink(entry / "ns" / kind) in spaces for kind in ("net", "mnt")):
                    found.append(int(entry.name))
            except OSError:
                pass  # it ended meanwhile
    return found


OWNER = """
import json, sys, time
from pathlib import Path
from tests.slurm_cluster import SlurmCluster
from tests.test_slurm_cluster import traces
cluster = SlurmCluster(Path(sys.argv[1]))
cluster.start()
print(json.dumps(traces(cluster)), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("end", ["stopped", "failed to start", "its test process killed"])
def test_nothing_remains_when_a_cluster_ends(end, slurm_cluster, tmp_path, monkeypatch):
    """slurm_cluster first: a machine that cannot run a cluster skips it, or fails it under CI=true."""
    hosts = Path("/etc/hosts").read_text()
    if end == "its test process killed":  # as when pytest is killed: pdeathsig and unshare --kill-child clean up
        with subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)}) as owner:
            try:
                seen = json.loads(owner.stdout.readline())
            finally:
                owner.send_signal(signal.SIGKILL)
    else:
        cluster = SlurmCluster(tmp_path)
        if end == "stopped":
            cluster.start()
            seen = traces(cluster)
            cluster.stop()
        else:  # every daemon up, but the nodes never come idle
            seen = {}

            def never_idle():
                seen.update(traces(cluster))
                raise ClusterError("no node came up")

            monkeypatch.setattr(cluster, "node_states", never_idle)
            with pytest.raises(ClusterError, match="no node came up"):
                cluster.start()
    assert len(seen["spaces"]) == 6 and len(seen["processes"]) >= 7  # 3 hosts' first processes, 4 daemons
    deadline = time.monotonic() + 10
    while in_namespaces(seen["spaces"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert in_namespaces(seen["spaces"]) == []
    assert len(seen["starters"]) == 7
    # Ended, all of them; with their test process killed, they are left to PID 1 to wait for (zombies until then).
    # (A PID with another command line is another process's now.)
    left = (lambda now, line: now == line) if end.endswith("killed") else (lambda now, line: now in (line, "zombie"))
    assert [(pid, line) for pid, line in seen["starters"] if left(command_line(pid), line)] == []
    assert f"{SUBNET}." not in host_addresses() and Path("/etc/hosts").read_text() == hosts
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()
    # The wrappers: gone, or (the test process killed) refusing, as they would name processes that are no more.
    if end.endswith("killed"):
        squeue = subprocess.run([tmp_path / "bin" / "squeue"], capture_output=True, text=True)
        assert squeue.returncode == 1 and squeue.stderr.endswith("is not running\n")
    else:
        assert not list((tmp_path / "bin").iterdir())


def test_a_cluster_with_gpus_in_name_takes_a_job_as_run_study_writes_them(slurm_cluster, tmp_path):
    """slurm_cluster first, to be skipped where it is. GPUs in name only: the job's step sees their numbers."""
    with SlurmCluster(tmp_path / "cluster", cpus=8, gpus=2) as cluster:
        out = tmp_path / "job.out"
        job = cluster.sbatch("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=2", "--cpus-per-task=8",
                             f"--output={out}", "--wrap", "srun sh -c 'echo $(hostname) $CUDA_VISIBLE_DEVICES' | sort")
        assert output_of(cluster, job, out).splitlines() == ["node1 0,1", "node2 0,1"]
        refused = cluster.run(["sbatch", "--gpus-per-node=3", "--wrap", "true"], check=False)
        assert refused.returncode == 1 and "Requested node configuration is not available" in refused.stderr
