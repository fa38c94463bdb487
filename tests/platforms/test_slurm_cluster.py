"""The SLURM test cluster (tests/slurm_cluster.py): a controller and two nodes, each a host in namespaces of its own,
that run real batch jobs and steps, and leave nothing behind on this machine. All of its tests are in this file, so
that pytest-xdist's --dist loadfile starts one cluster (the session fixture) on one worker."""

from __future__ import annotations

import json
import os
import re
import shlex
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
    assert f"NodeAddr={SUBNET}.12" in shown and "CPUTot=4" in shown


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
    spaces = [os.readlink(f"/proc/{pid}/ns/{kind}") for pid in cluster.hosts.pids.values() for kind in ("net", "mnt")]
    starters = [*cluster.hosts.holders.values(), *cluster.daemons.values()]
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
from tests.platforms.test_slurm_cluster import traces
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


# -- training on the cluster's CPU nodes: slurm/hpml_ddp.sbatch and run_study.py --where slurm

# A run of 12 steps per rank and epoch at world size 2 (ranks agree on a stop every 10 steps), 3 epochs.
DDP_FLAGS = ["--model", "resnet18", "--dataset", "synthetic", "--subset", "48", "--batch-size", "2", "--epochs", "3",
             "--workers", "0"]
JOB_S = 240  # the longest a training job may take: two cores, shared with the other test workers


def job_env(cluster: SlurmCluster, **more: str) -> dict[str, str]:
    """The cluster's clients and this Python's torchrun on PATH, one CPU thread per training process, and output
    unbuffered, so that a job's log shows each line when it is printed."""
    return {**cluster.env, "PATH": f"{cluster.bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **more}


def sbatch_ddp(cluster: SlurmCluster, folder: Path, nodes: int, processes: int, *flags: str) -> str:
    """slurm/hpml_ddp.sbatch on CPU nodes, as its header says: DDP_FLAGS, results in <folder>/out, log in
    <folder>/job.out; the job's id."""
    done = subprocess.run([str(cluster.bin_dir / "sbatch"), "--parsable", f"--nodes={nodes}", "--gpus-per-node=0",
                           f"--cpus-per-task={processes}", f"--output={folder / 'job.out'}", "slurm/hpml_ddp.sbatch",
                           *DDP_FLAGS, "--output-dir", str(folder / "out"), *flags],
                          cwd=REPO, env=job_env(cluster, NPROC_PER_NODE=str(processes)), capture_output=True,
                          text=True, timeout=60, check=True)
    return done.stdout.strip()


def only_record(folder: Path) -> dict:
    (path,) = folder.glob("*.json")
    return json.loads(path.read_text())


def learning(record: dict) -> list[float]:
    """What a run learned, epoch after epoch (not how fast)."""
    return [epoch[key] for epoch in record["epochs"] for key in ("epoch", "lr", "train_loss", "train_acc", "test_loss",
                                                                 "test_acc", "train_images", "test_images")]


@pytest.fixture(scope="module")
def ddp_runs(slurm_cluster, tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """slurm/hpml_ddp.sbatch's runs of DDP_FLAGS on 2 nodes of 1 process and 1 node of 2, at the same time:
    {"2x1" or "1x2": (job id, folder)}."""
    runs = {}
    for nodes, processes in ((2, 1), (1, 2)):
        folder = tmp_path_factory.mktemp(f"ddp{nodes}x{processes}")
        runs[f"{nodes}x{processes}"] = sbatch_ddp(slurm_cluster, folder, nodes, processes), folder
    for job, folder in runs.values():
        assert slurm_cluster.wait_job(job, timeout=JOB_S) == "COMPLETED", (folder / "job.out").read_text()
    return runs


def test_hpml_ddp_sbatch_runs_on_two_cpu_nodes_and_writes_one_record_of_two_nodes(ddp_runs):
    job, folder = ddp_runs["2x1"]
    record = only_record(folder / "out")
    assert (record["nodes"], record["world_size"], record["launcher"]) == (2, 2, "torchrun")
    log = (folder / "job.out").read_text()
    assert f"rendezvous at node1:{20000 + int(job) % 20000}\n" in log  # a port of the job's own
    assert log.count("resnet18 epoch ") == 3  # rank 0 alone logs


def test_two_nodes_of_one_process_learn_what_one_node_of_two_processes_learns(ddp_runs):
    """The random streams depend on the rank, not the host: the same run on other hosts is the same run."""
    across, within = (only_record(ddp_runs[layout][1] / "out") for layout in ("2x1", "1x2"))
    assert (across["nodes"], within["nodes"]) == (2, 1)
    assert learning(across) == pytest.approx(learning(within), abs=1e-6)


def wait_for_line(cluster: SlurmCluster, job: str, log: Path, text: str) -> None:
    deadline = time.monotonic() + JOB_S
    while text not in (log.read_text() if log.exists() else ""):
        assert cluster.job_state(job) in ("PENDING", "RUNNING"), log.read_text() if log.exists() else cluster.logs()
        assert time.monotonic() < deadline, f"no {text!r} in job {job}'s log after {JOB_S} s"
        time.sleep(0.1)


def test_a_cancelled_two_node_job_stops_at_one_step_and_resumes_to_the_same_learning(slurm_cluster, ddp_runs,
                                                                                      tmp_path):
    first = sbatch_ddp(slurm_cluster, tmp_path, 2, 1)
    wait_for_line(slurm_cluster, first, tmp_path / "job.out", "resnet18 epoch 1/3")
    slurm_cluster.run(["scancel", first])  # SIGTERM to every process of the job, SIGKILL KillWait later
    assert slurm_cluster.wait_job(first, timeout=JOB_S) == "CANCELLED"
    log = (tmp_path / "job.out").read_text()
    assert log.count("stopped by a signal") == 1, log  # rank 0 speaks for both ranks, which stopped together
    assert "; rerun with --resume to continue" in log and not list((tmp_path / "out").glob("*.json"))

    (tmp_path / "job.out").rename(tmp_path / "cancelled.out")
    again = sbatch_ddp(slurm_cluster, tmp_path, 2, 1, "--resume")
    assert slurm_cluster.wait_job(again, timeout=JOB_S) == "COMPLETED", (tmp_path / "job.out").read_text()
    assert "resnet18: resuming from " in (tmp_path / "job.out").read_text()
    resumed, uninterrupted = only_record(tmp_path / "out"), only_record(ddp_runs["2x1"][1] / "out")
    assert resumed["resumes"] == 1 and resumed["nodes"] == 2
    assert learning(resumed) == pytest.approx(learning(uninterrupted), abs=1e-6)


def run_study(cluster: SlurmCluster, folder: Path, *argv: str) -> subprocess.CompletedProcess:
    """run_study.py on the cluster's login node (the controller), in `folder`."""
    done = subprocess.run([sys.executable, str(REPO / "run_study.py"), *argv], cwd=folder, env=job_env(cluster),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    return done


def submitted(done: subprocess.CompletedProcess) -> dict[str, str]:
    """{cell: job id} of what a run_study.py --where slurm submitted."""
    return dict(re.findall(r"^(.+): submitted as job (\d+) ", done.stdout, re.MULTILINE))


def test_run_study_trains_on_the_cpu_nodes_collects_and_submits_a_cancelled_cell_again(slurm_cluster, tmp_path):
    """Two models at world sizes 1 and 2 (two nodes of one process); a third model's cell, cancelled while it runs.
    The first study activates this virtual environment in --setup; the second runs this python."""
    common = ["--where", "slurm", "--gpus-per-node", "0", "--dataset", "synthetic", "--subset", "32",
              "--batch-size", "8", "--epochs", "1", "--workers", "0", "--output-dir", str(tmp_path / "out"),
              "--figures-dir", str(tmp_path / "figures")]
    study = [*common, "--models", "resnet18,shufflenetv2", "--world-sizes", "1,2",
             "--setup", f"source {shlex.quote(str(Path(sys.prefix) / 'bin' / 'activate'))}"]
    third = [*common, "--models", "mobilenetv2", "--world-sizes", "2"]
    jobs = submitted(run_study(slurm_cluster, tmp_path, *study))
    assert sorted(jobs) == ["resnet18 x1 (single) #1", "resnet18 x2 (distributed) #1", "shufflenetv2 x1 (single) #1",
                            "shufflenetv2 x2 (distributed) #1"]
    (cancelled,) = submitted(run_study(slurm_cluster, tmp_path, *third)).values()
    deadline = time.monotonic() + JOB_S
    while slurm_cluster.job_state(cancelled) != "RUNNING":
        assert time.monotonic() < deadline, slurm_cluster.logs()
        time.sleep(0.1)
    slurm_cluster.run(["scancel", cancelled])
    assert {job: slurm_cluster.wait_job(job, timeout=JOB_S) for job in jobs.values()} == dict.fromkeys(
        jobs.values(), "COMPLETED"), [path.read_text() for path in (tmp_path / "out" / "slurm").glob("*.out")]
    assert slurm_cluster.wait_job(cancelled, timeout=JOB_S) == "CANCELLED"

    collected = run_study(slurm_cluster, tmp_path, *study, "--collect")
    assert collected.returncode == 0 and "4 of 4 cells finished" in collected.stdout
    assert (tmp_path / "figures" / "Speedup.png").exists()
    records = [json.loads(path.read_text()) for path in (tmp_path / "out").glob("*.json")]
    assert sorted((record["world_size"], record["nodes"]) for record in records) == [(1, 1), (1, 1), (2, 2), (2, 2)]
    again = run_study(slurm_cluster, tmp_path, *study)
    assert "4 already in" in again.stdout and ", 0 to run" in again.stdout
    assert submitted(again) == {} and "--collect" not in again.stdout

    again = run_study(slurm_cluster, tmp_path, *third)
    cell = "mobilenetv2 x2 (distributed) #1"
    assert f"{cell}: job {cancelled} CANCELLED, submitting again" in again.stdout
    (job,) = submitted(again).values()
    assert slurm_cluster.wait_job(job, timeout=JOB_S) == "COMPLETED"
    collected = run_study(slurm_cluster, tmp_path, *third, "--collect")
    assert collected.returncode == 0 and "1 of 1 cell finished" in collected.stdout
