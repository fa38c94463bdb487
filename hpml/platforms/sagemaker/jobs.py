"""SageMaker training jobs from the client: check, stage, submit, watch, collect, list.

The one module that knows the SageMaker SDK and AWS: a job runs run_distributed.py, or run_hpc.py (the single-device
path) for the baseline; its code and data go to S3, its logs are streamed, and its results are brought home.

The SageMaker Python SDK is imported on first use, not with this module: importing it takes seconds and, without
credentials in the environment, makes it probe the EC2 instance-metadata address. Only sagemaker_submission.py
imports this module, so the training scripts never load the SDK.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import IO, TYPE_CHECKING

import boto3
import boto3.exceptions
import botocore.awsrequest
import botocore.client
import botocore.config
import botocore.credentials
import botocore.exceptions
import botocore.session
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from tqdm import tqdm

import hpml
import models as model_zoo
from hpml import config, data, files, results, scripts
from hpml.errors import UsageError, one_line
from hpml.platforms.sagemaker import prices
from hpml.platforms.sagemaker.plan import ENDED

if TYPE_CHECKING:  # imported on first use at run time (see above)
    import sagemaker.debugger
    import sagemaker.estimator
    import sagemaker.session

DATA_PARALLEL_SCRIPT = "run_distributed.py"
SINGLE_DEVICE_SCRIPT = "run_hpc.py"  # the single-device path: one process on one GPU, the speedups' baseline
# The script each distribution runs: data-parallel under SMDDP or torchrun; the single-device path without one.
ENTRY_POINTS = {"smddp": DATA_PARALLEL_SCRIPT, "torchrun": DATA_PARALLEL_SCRIPT, "none": SINGLE_DEVICE_SCRIPT}
# SageMaker's toolkit runs a script file (with python, torchrun, or mpirun's `python -m mpi4py`): the job's source
# folder gets one per entry point, written when it is staged, that runs the script's module from the packages beside it.
ENTRY_MODULES = {DATA_PARALLEL_SCRIPT: scripts.DATA_PARALLEL, SINGLE_DEVICE_SCRIPT: scripts.SINGLE_DEVICE}
ENTRY_SCRIPT = '''"""SageMaker's entry point, written by hpml's submission: the module {module} as a script."""

from {module} import run_as_script

if __name__ == "__main__":
    run_as_script()
'''
# The code a job needs, and nothing else: the hpml and models packages from wherever this client imports them, a
# checkout or an installed package (no data, results, tests, virtual environments or git history).
CODE_PACKAGES = (Path(hpml.__file__).parent, Path(model_zoo.__file__).parent)
SOURCE_SUFFIXES = (".py",)  # the job's code is Python only: keys, notes, caches and data in those folders stay home
# hpml's requirements that a job leaves out of the requirements.txt SageMaker pip-installs: its container's own torch,
# torchvision, numpy and pillow (torch from an index would replace the container's CUDA build), and matplotlib (the
# figures are drawn where the results are collected).
NOT_IN_JOBS = frozenset({"torch", "torchvision", "numpy", "pillow", "matplotlib"})
S3_PREFIX = "hpml"
SUITE_TAG = {"Key": "hpml-suite", "Value": "hpml"}  # `list` and `collect --all` find this suite's jobs by it
LOG_POLL_S = 10  # seconds between looks at a job's logs and status while `--wait` streams them

DISTRIBUTIONS = {
    "smddp": {"smdistributed": {"dataparallel": {"enabled": True}}},
    "torchrun": {"torch_distributed": {"enabled": True}},
    "none": None,
}
BACKENDS_FOR_DISTRIBUTION = {  # what the job's script can start under each launcher (the single-device path has none)
    "smddp": ("auto", "smddp"),
    "torchrun": ("auto", "smddp", "nccl", "gloo"),
    "none": ("auto",),
}
# The newest PyTorch for which the pinned SDK offers SMDDP (its fw_utils.SM_DATAPARALLEL_SUPPORTED_FRAMEWORK_VERSIONS),
# and the only Python of that container image.
DEFAULT_FRAMEWORK_VERSION = "2.2.0"
DEFAULT_PY_VERSION = "py310"
TELEMETRY_OFF = {"SchemaVersion": "1.0", "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}}
NOTEBOOK_METADATA = Path("/opt/ml/metadata/resource-metadata.json")  # present in SageMaker notebooks and Studio
# The metrics SageMaker charts for a job, in its console and in CloudWatch, read from the line each model prints per
# epoch (hpml.training.loop.format_epoch; printed inside a job even with --quiet): one definition per model and
# metric, named <model>:<metric>, whose regex captures the value in its one group. The five models make 30
# definitions; SageMaker takes up to 40, each regex up to 500 characters.
EPOCH_LINE = (r"{model} epoch [0-9]+/[0-9]+: train loss {train_loss} acc {train_acc} \| test loss {test_loss} "
              r"acc {test_acc} \| {epoch_time_s}s \([0-9.]+s data\) {images_per_s} img/s")
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s", "images_per_s")

NO_CREDENTIALS = ("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN "
                  "for temporary keys), run `aws configure` or `aws sso login`, choose a profile with --aws-profile or "
                  "AWS_PROFILE, or run where an IAM role provides them (EC2, a SageMaker notebook)")
NO_REGION = "no AWS region: pass --region (e.g. us-east-1), set AWS_REGION, or run `aws configure`"

ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+")
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
JOB_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
# A job's output archive is written by whatever ran in the job: what collecting it downloads and unpacks is bounded.
MAX_OUTPUT_ARCHIVE_BYTES = 2 << 30  # 2 GiB of output.tar.gz; a job's results and monitor files take megabytes
MAX_EXPANDED_BYTES = 512 << 20  # 512 MiB of unzipped tar stream: every member's header and content, read or skipped
MAX_ARCHIVE_MEMBERS = 10_000  # tarfile keeps each member's header in memory


@dataclass
class JobSpec:
    """One training job as the user asked for it, checked."""

    job_name: str
    instance_type: str
    instance_count: int
    distribution: str
    framework_version: str
    py_version: str
    hyperparameters: dict[str, str]
    region: str
    role: str | None  # None only in a dry run
    bucket: str | None  # None: the account's default SageMaker bucket
    s3_data: str | None  # the data channel; None for the synthetic data set
    spot: bool
    max_run: int
    max_wait: int | None
    keep_alive: int | None = None  # seconds SageMaker keeps the instances warm for a next job of the same setup

    @property
    def requirements(self) -> tuple[str, ...]:
        """What the job pip-installs beside the container's own packages."""
        return job_requirements(tensorboard=bool(self.hyperparameters.get("tensorboard")))

    @property
    def shown_bucket(self) -> str:
        """The bucket, or before submit has asked AWS for the account number, the default bucket's name pattern."""
        return self.bucket or f"sagemaker-{self.region}-ACCOUNT_ID"

    def estimated_cost(self) -> float | None:
        """The most the job can cost on demand: it is stopped after max_run seconds."""
        return prices.instances_cost_usd(self.instance_type, self.instance_count, self.max_run)


# ---- the SDK -------------------------------------------------------------------------------------------------------


def sdk() -> ModuleType:
    """The SageMaker SDK (2.x), imported quietly and without probing the network."""
    os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")  # 2.x is pinned on purpose, see pyproject.toml
    for name in ("sagemaker", "sagemaker.config"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # At import the SDK builds a session of its own, whose credential lookup ends at the instance-metadata address.
    with _env("AWS_EC2_METADATA_DISABLED", "true"):
        import sagemaker.pytorch
    _validate_each_config_once(sagemaker.utils)
    return sagemaker


def _validate_each_config_once(utils: ModuleType) -> None:
    """The SDK checks its config (here TELEMETRY_OFF) against its JSON schema at every one of the ~20 lookups a
    submission makes, half a second of CPU each: a config it has accepted once it accepts again without a check."""
    validate = utils.validate_sagemaker_config
    if getattr(validate, "accepted", None) is not None:
        return
    accepted: set[str] = set()

    def validate_once(config: dict) -> None:
        key = json.dumps(config, sort_keys=True, default=str)
        if key not in accepted:
            validate(config)
            accepted.add(key)

    validate_once.accepted = accepted
    utils.validate_sagemaker_config = validate_once


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


@contextlib.contextmanager
def aws_errors() -> Iterator[None]:
    """What AWS refused, as a one-line UsageError."""
    try:
        yield
    except botocore.exceptions.NoCredentialsError:
        raise UsageError(NO_CREDENTIALS) from None
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, boto3.exceptions.Boto3Error) as error:
        raise UsageError(f"AWS: {one_line(error)}") from None


# ---- checks that need no AWS ---------------------------------------------------------------------------------------


def check_distribution(distribution: str, instance_type: str, instance_count: int, framework_version: str,
                       py_version: str, backend: str, device: str, region: str) -> None:
    """UsageError unless the pinned SDK can run this distribution on this instance type and container."""
    if not re.fullmatch(r"ml\.[a-z0-9-]+\.[a-z0-9-]+", instance_type):
        raise UsageError(f"--instance-type must be a SageMaker instance type like ml.p4d.24xlarge, "
                         f"got {instance_type!r}")
    if distribution == "none" and instance_count > 1:
        raise UsageError(f"--distribution none trains on one instance, got --instance-count {instance_count}; "
                         "use --distribution smddp or torchrun for several")
    allowed_backends = BACKENDS_FOR_DISTRIBUTION[distribution]
    if backend not in allowed_backends:
        raise UsageError(f"--backend {backend} does not work with --distribution {distribution}; "
                         f"use one of {', '.join(allowed_backends)}")
    if distribution == "smddp" or backend == "smddp":
        check_smddp(instance_type, framework_version, device)
    with _quiet_sdk_errors():  # the checks the SDK makes when it builds the estimator, before anything is sent
        sdk().image_uris.retrieve("pytorch", region=region, version=framework_version, py_version=py_version,
                                  instance_type=instance_type, image_scope="training")
        if DISTRIBUTIONS[distribution]:
            sdk().fw_utils.validate_distribution(DISTRIBUTIONS[distribution], None, "pytorch", framework_version,
                                                 py_version, None, {"instance_type": instance_type,
                                                                    "entry_point": ENTRY_POINTS[distribution]})


def check_smddp(instance_type: str, framework_version: str, device: str) -> None:
    fw_utils = sdk().fw_utils
    instance_types = [name for name in fw_utils.SM_DATAPARALLEL_SUPPORTED_INSTANCE_TYPES if name.startswith("ml.")]
    if instance_type not in instance_types:
        raise UsageError(f"SMDDP does not run on {instance_type}; supported instance types: "
                         f"{', '.join(instance_types)} (or use --distribution torchrun with --backend nccl)")
    versions = fw_utils.SM_DATAPARALLEL_SUPPORTED_FRAMEWORK_VERSIONS["pytorch"]
    if framework_version not in versions:
        raise UsageError(f"SMDDP does not support PyTorch {framework_version}; supported --framework-version: "
                         f"{', '.join(versions)}")
    if device == "cpu":
        raise UsageError("--device cpu: SMDDP trains on GPUs only; use --device auto or cuda")


@contextlib.contextmanager
def _quiet_sdk_errors() -> Iterator[None]:
    """The SDK reports bad arguments as multi-line ValueErrors: make them one-line UsageErrors."""
    try:
        yield
    except ValueError as error:
        raise UsageError(one_line(error)) from None


def check_role(role: str, source: str = "--role") -> str:
    """`role` when it is an IAM role ARN; UsageError naming `source` (the flag, or the variable it came from)."""
    if not ROLE_ARN.fullmatch(role):
        raise UsageError(f"{source} must be an IAM role ARN like arn:aws:iam::123456789012:role/NAME, got {role!r}")
    return role


def check_job_name(name: str) -> str:
    if not JOB_NAME.fullmatch(name):
        raise UsageError(f"--job-name must be 1-63 letters, digits and hyphens, starting with a letter or digit, "
                         f"got {name!r}")
    return name


def check_bucket(name: str) -> str:
    if not BUCKET_NAME.fullmatch(name) or ".." in name:
        raise UsageError(f"--bucket must be an S3 bucket name (3-63 lowercase letters, digits, dots, hyphens), "
                         f"got {name!r}")
    return name


def parse_s3_uri(uri: str, flag: str) -> tuple[str, str]:
    """(bucket, key prefix) of s3://bucket/prefix; UsageError for anything else."""
    match = re.fullmatch(r"s3://([^/]+)/?(.*)", uri)
    if not match or not BUCKET_NAME.fullmatch(match[1]) or ".." in match[1]:
        raise UsageError(f"{flag} must be an S3 location like s3://my-bucket/cifar10/, got {uri!r}")
    return match[1], match[2]


def default_role(ask_aws: bool) -> str | None:
    """$HPML_SAGEMAKER_ROLE (UsageError naming it when it is no role ARN); else inside a SageMaker notebook or Studio,
    the notebook's own role (which takes AWS calls to find); else None."""
    if "HPML_SAGEMAKER_ROLE" in os.environ:
        return check_role(os.environ["HPML_SAGEMAKER_ROLE"], "environment variable HPML_SAGEMAKER_ROLE")
    if ask_aws and NOTEBOOK_METADATA.exists():
        with _quiet_sdk_errors():
            return sdk().get_execution_role()
    return None


def job_name_for(models: list[str], distribution: str) -> str:
    """hpml-<model>-<distribution>-<UTC time to the millisecond>, as the SDK names jobs."""
    what = models[0] if len(models) == 1 else f"{len(models)}models"
    return sdk().utils.name_from_base(f"hpml-{what}-{distribution}")


# ---- code and data -------------------------------------------------------------------------------------------------


def job_requirements(tensorboard: bool) -> tuple[str, ...]:
    """What a job pip-installs beside its container's packages: hpml's own requirements and its train extra's (and its
    tensorboard extra's, for a job that writes TensorBoard scalars), as the installed package declares them, less
    NOT_IN_JOBS. UsageError when hpml is not installed (a checkout without `pip install -e`)."""
    extras = ("train", "tensorboard") if tensorboard else ("train",)
    try:
        declared = importlib.metadata.requires("hpml") or []
    except importlib.metadata.PackageNotFoundError:
        raise UsageError("hpml is not installed, so what its jobs need is unknown: pip install -e '.[client]' in "
                         "its checkout") from None
    needed = []
    for requirement in map(Requirement, declared):
        marker, requirement.marker = requirement.marker, None
        if canonicalize_name(requirement.name) not in NOT_IN_JOBS and (
                marker is None or any(marker.evaluate({"extra": extra}) for extra in extras)):
            needed.append(str(requirement))
    return tuple(needed)


def stage_source(folder: Path, requirements: tuple[str, ...], log: Callable[[str], None] = print) -> list[Path]:
    """Lay out the job's source folder: the SOURCE_SUFFIXES files of CODE_PACKAGES, an entry script for each of
    ENTRY_MODULES, and a requirements.txt listing `requirements`; return its files, relative to it. Links are not
    followed; they, hidden files and folders, and every other file that is not source are left out, each named in a
    line (__pycache__ without one)."""
    for package in CODE_PACKAGES:
        for relative in _source_files(package, log):
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(package.parent / relative, folder / relative)
    for script, module in ENTRY_MODULES.items():
        (folder / script).write_text(ENTRY_SCRIPT.format(module=module))
    (folder / "requirements.txt").write_text("\n".join(requirements) + "\n")
    return sorted(path.relative_to(folder) for path in folder.rglob("*") if path.is_file())


def _source_files(package: Path, log: Callable[[str], None]) -> Iterator[Path]:
    """The package's files to stage, relative to the folder holding it."""
    pending = [package]
    while pending:
        path = pending.pop()
        relative = path.relative_to(package.parent)
        if path.name == "__pycache__":
            continue
        if path.name.startswith("."):
            log(f"code: {relative} left out: hidden")
        elif path.is_symlink():
            log(f"code: {relative} left out: a link, not followed")
        elif path.is_dir():
            pending += sorted(path.iterdir(), reverse=True)
        elif path.is_file() and path.suffix in SOURCE_SUFFIXES:
            yield relative
        else:
            log(f"code: {relative} left out: not a {'/'.join(SOURCE_SUFFIXES)} source file")


@dataclass
class DataUpload:
    """A local CIFAR-10 folder and where its files go in S3: a prefix named by their content."""

    folder: Path
    files: list[tuple[Path, str, str]]  # (local file, key under the prefix, sha256)
    prefix: str

    @classmethod
    def of(cls, folder: Path) -> DataUpload:
        relative = cifar_files(folder)
        data.load_cifar10(folder)  # the training scripts' own checks, before anything is uploaded
        hashed = [(path, key, _sha256(path)) for path, key in relative]
        digest = hashlib.sha256("".join(f"{key} {sha}\n" for _, key, sha in hashed).encode()).hexdigest()
        return cls(folder, hashed, f"{S3_PREFIX}/data/cifar10-{digest[:16]}/")

    @property
    def size(self) -> int:
        return sum(path.stat().st_size for path, _, _ in self.files)


def cifar_files(folder: Path) -> list[tuple[Path, str]]:
    """The files the training scripts read from a CIFAR-10 folder, each with its key in the job's data channel."""
    if not folder.is_dir():
        raise UsageError(f"no CIFAR-10 folder at {folder.resolve()}: pass --data-dir DIR to upload a local copy, "
                         "--s3-data s3://BUCKET/PREFIX for one already in S3, or --dataset synthetic")
    found = data.cifar10_files(folder)
    if found is None:
        raise UsageError(f"no CIFAR-10 in {folder.resolve()}: expected train.npz and test.npz, or "
                         f"{data.BATCHES_FOLDER}/; pass --s3-data for data already in S3, or --dataset synthetic")
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with files.open_regular(path) as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- AWS sessions --------------------------------------------------------------------------------------------------


def boto_session(region: str | None, profile: str | None) -> boto3.Session:
    """A boto3 session from the standard credential chain; UsageError for an unknown profile."""
    try:
        return boto3.Session(profile_name=profile, region_name=region)
    except botocore.exceptions.ProfileNotFound as error:
        raise UsageError(f"{error} (see ~/.aws/config; pass --aws-profile NAME or unset AWS_PROFILE)") from None


def resolve_region(region: str | None, profile: str | None) -> str | None:
    """--region, else the profile's or environment's region (read from local config only), else None."""
    return region or boto_session(None, profile).region_name


def aws_session(region: str | None, profile: str | None) -> boto3.Session:
    """A session with a region and credentials, or a one-line UsageError saying how to configure them."""
    session = boto_session(region, profile)
    if not session.region_name:
        raise UsageError(NO_REGION)
    try:
        credentials = session.get_credentials()
    except botocore.exceptions.BotoCoreError as error:
        raise UsageError(f"cannot load AWS credentials: {one_line(error)}") from None
    if credentials is None:
        raise UsageError(NO_CREDENTIALS)
    return session


def _offline_session(region: str, profile: str | None) -> boto3.Session:
    """A session that has no credentials and never looks for any: a dry run cannot call AWS by accident."""
    core = botocore.session.Session(profile=profile)
    core.register_component("credential_provider", botocore.credentials.CredentialResolver([]))
    return boto3.Session(botocore_session=core, region_name=region)


def sagemaker_session(boto: boto3.Session, bucket: str,
                      sagemaker_client: botocore.client.BaseClient | None = None) -> sagemaker.session.Session:
    """An SDK session with telemetry off and `bucket` as its default bucket (and `sagemaker_client` as its client,
    where given)."""
    return sdk().session.Session(boto_session=boto, default_bucket=bucket, sagemaker_config=TELEMETRY_OFF,
                                 sagemaker_client=sagemaker_client)


def account_quotas(boto: boto3.Session) -> tuple[dict[str, float] | None, str]:
    """The account's SageMaker quotas in this region by name, and a note saying where they came from; None (and why)
    when the Service Quotas API does not answer (no permission for it, or no such API where these calls go)."""
    client = boto.client("service-quotas", config=botocore.config.Config(retries={"max_attempts": 1}))
    quotas: dict[str, float] = {}
    try:
        for page in client.get_paginator("list_service_quotas").paginate(ServiceCode="sagemaker"):
            quotas.update({quota["QuotaName"]: quota["Value"] for quota in page.get("Quotas", [])})
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        return None, f"Service Quotas did not answer ({one_line(error)})"
    return quotas, f"the account's SageMaker quotas in {boto.region_name}"


def ensure_bucket(boto: boto3.Session, bucket: str | None) -> str:
    """--bucket if it exists and is reachable; else the account's sagemaker-<region>-<account> bucket, created
    when missing, and refused when someone else owns that name (as the SDK's default_bucket does)."""
    s3 = boto.client("s3")
    if bucket:
        try:
            s3.head_bucket(Bucket=bucket)
        except botocore.exceptions.ClientError as error:
            raise UsageError(f"--bucket {bucket}: {_client_error_text(error)}") from None
        return bucket
    # The SDK finds the account through a fixed regional STS address; boto3's client honours the standard endpoint
    # settings (AWS_ENDPOINT_URL and friends) as well.
    account = boto.client("sts").get_caller_identity()["Account"]
    bucket = f"sagemaker-{boto.region_name}-{account}"
    try:
        s3.head_bucket(Bucket=bucket, ExpectedBucketOwner=account)
    except botocore.exceptions.ClientError as error:
        if _status(error) != 404:
            raise UsageError(f"default bucket {bucket}: {_client_error_text(error)}; pass --bucket") from None
        where = {} if boto.region_name == "us-east-1" else {
            "CreateBucketConfiguration": {"LocationConstraint": boto.region_name}}
        s3.create_bucket(Bucket=bucket, **where)
        print(f"created S3 bucket {bucket}")
    return bucket


def _status(error: botocore.exceptions.ClientError) -> int | None:
    return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _client_error_text(error: botocore.exceptions.ClientError) -> str:
    if _status(error) == 404:
        return "no such bucket"
    if _status(error) == 403:
        return "access denied (not your bucket, or your credentials lack S3 access)"
    return one_line(error)


def check_s3_data(boto: boto3.Session, uri: str) -> None:
    bucket, prefix = parse_s3_uri(uri, "--s3-data")
    try:
        listing = boto.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except botocore.exceptions.ClientError as error:
        raise UsageError(f"--s3-data {uri}: {_client_error_text(error)}") from None
    if not listing.get("KeyCount"):
        raise UsageError(f"--s3-data {uri}: no files there; upload CIFAR-10 (train.npz and test.npz) first, "
                         f"or pass --data-dir to upload a local copy")


def upload_data(boto: boto3.Session, bucket: str, upload: DataUpload, log: Callable[[str], None] = print) -> str:
    """Put the data set's files under their content-named prefix unless the same files are there; its S3 URI."""
    s3 = boto.client("s3")
    missing = [(path, key, sha) for path, key, sha in upload.files
               if not _same_object(s3, bucket, upload.prefix + key, path, sha)]
    uri = f"s3://{bucket}/{upload.prefix}"
    if not missing:
        log(f"data: already in {uri} (same sizes and SHA-256), not uploaded again")
        return uri
    total = sum(path.stat().st_size for path, _, _ in missing)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"uploading data to {uri}") as bar:
        for path, key, sha in missing:
            s3.upload_file(str(path), bucket, upload.prefix + key, ExtraArgs={"Metadata": {"sha256": sha}},
                           Callback=bar.update)
    return uri


def _same_object(s3: botocore.client.BaseClient, bucket: str, key: str, path: Path, sha: str) -> bool:
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as error:
        if _status(error) == 404:
            return False
        raise
    return head["ContentLength"] == path.stat().st_size and head.get("Metadata", {}).get("sha256") == sha


# ---- the job -------------------------------------------------------------------------------------------------------


def s3_locations(bucket: str, job_name: str) -> dict[str, str]:
    root = f"s3://{bucket}/{S3_PREFIX}"
    return {"output": f"{root}/output", "code": f"{root}/code", "checkpoints": f"{root}/checkpoints/{job_name}",
            "tensorboard": f"{root}/tensorboard/{job_name}/"}


def metric_definitions(models: list[str]) -> list[dict[str, str]]:
    """SageMaker's metric definitions of each model's per-epoch metrics (see EPOCH_LINE)."""
    number = "[0-9.]+"
    return [{"Name": f"{model}:{metric}",
             "Regex": EPOCH_LINE.format(model=re.escape(model),
                                        **{name: f"({number})" if name == metric else number for name in METRICS})}
            for model in models for metric in METRICS]


def tensorboard_output(spec: JobSpec, where: dict[str, str]) -> sagemaker.debugger.TensorBoardOutputConfig | None:
    """The job's TensorBoard output: the folder its script writes (its --tensorboard, when given), uploaded to S3."""
    folder = spec.hyperparameters.get("tensorboard")
    return sdk().debugger.TensorBoardOutputConfig(where["tensorboard"], folder) if folder else None


def estimator(spec: JobSpec, session: sagemaker.session.Session, bucket: str,
              source_dir: str) -> sagemaker.estimator.EstimatorBase:
    """The SDK's PyTorch estimator for the job."""
    where = s3_locations(bucket, spec.job_name)
    with _quiet_sdk_errors():
        return sdk().pytorch.PyTorch(
            entry_point=ENTRY_POINTS[spec.distribution],
            source_dir=source_dir,
            role=spec.role,
            instance_type=spec.instance_type,
            instance_count=spec.instance_count,
            framework_version=spec.framework_version,
            py_version=spec.py_version,
            distribution=DISTRIBUTIONS[spec.distribution],
            hyperparameters=spec.hyperparameters,
            output_path=where["output"],
            code_location=where["code"],
            checkpoint_s3_uri=where["checkpoints"],
            checkpoint_local_path=config.JOB_CHECKPOINT_DIR,
            metric_definitions=metric_definitions(spec.hyperparameters["model"].split(",")),
            tensorboard_output_config=tensorboard_output(spec, where),
            use_spot_instances=spec.spot,
            max_run=spec.max_run,
            max_wait=spec.max_wait if spec.spot else None,
            keep_alive_period_in_seconds=spec.keep_alive,
            tags=[SUITE_TAG],
            # SageMaker Debugger and Profiler hooks would run inside the timed training loop: keep them out.
            debugger_hook_config=False,
            disable_profiler=True,
            sagemaker_session=session,
        )


def _inputs(spec: JobSpec) -> dict[str, str] | None:
    return {config.DATA_CHANNEL: spec.s3_data} if spec.s3_data else None


def dry_run_request(spec: JobSpec, profile: str | None) -> dict:
    """The CreateTrainingJob request that submit would send, built by the SDK itself, with nothing sent.

    botocore's event hooks on the session's SageMaker client keep the call's parameters as the SDK passes them
    (before-parameter-build) and answer the call in place of SageMaker (before-call). The source folder is given
    as the S3 location where submit uploads it, so the SDK does not upload it.
    """
    boto = _offline_session(spec.region, profile)
    client = boto.client("sagemaker")
    request: dict = {}
    client.meta.events.register("before-parameter-build.sagemaker.CreateTrainingJob",
                                lambda params, **_: request.update(copy.deepcopy(params)))
    answer = (botocore.awsrequest.AWSResponse("", 200, {}, None),  # SageMaker's, made up: the call goes nowhere
              {"TrainingJobArn": f"arn:aws:sagemaker:::training-job/{spec.job_name}"})
    client.meta.events.register("before-call.sagemaker.CreateTrainingJob", lambda **_: answer)
    bucket = spec.shown_bucket
    session = sagemaker_session(boto, bucket, client)
    source = f"{s3_locations(bucket, spec.job_name)['code']}/{spec.job_name}/source/sourcedir.tar.gz"
    with _quiet_sdk_errors():
        estimator(spec, session, bucket, source).fit(_inputs(spec), wait=False, job_name=spec.job_name)
    return request


def submit(spec: JobSpec, session: sagemaker.session.Session) -> None:
    """Upload the code and start the job (the SDK does both); return once SageMaker has accepted it."""
    with tempfile.TemporaryDirectory(prefix="hpml-source-") as folder:
        stage_source(Path(folder), spec.requirements)
        job = estimator(spec, session, spec.bucket, folder)
        with _quiet_sdk_errors():
            job.fit(_inputs(spec), wait=False, job_name=spec.job_name)


def stream_logs(session: sagemaker.session.Session, job_name: str) -> dict:
    """Print the job's CloudWatch logs until it ends; its final description."""
    try:
        session.logs_for_job(job_name, wait=True, poll=LOG_POLL_S, log_type="All")
    except sdk().exceptions.UnexpectedStatusException:
        pass  # a failed or stopped job: its description says why
    return session.describe_training_job(job_name)


def console_url(region: str, job_name: str) -> str:
    return f"https://{region}.console.aws.amazon.com/sagemaker/home?region={region}#/jobs/{job_name}"


# ---- finding and collecting jobs -----------------------------------------------------------------------------------


def suite_jobs(boto: boto3.Session, limit: int | None = None) -> list[dict]:
    """This suite's jobs (tagged at submit), newest first, with everything DescribeTrainingJob tells."""
    client = boto.client("sagemaker")
    query = {"Resource": "TrainingJob", "SortBy": "CreationTime", "SortOrder": "Descending",
             "SearchExpression": {"Filters": [{"Name": f"Tags.{SUITE_TAG['Key']}", "Operator": "Equals",
                                               "Value": SUITE_TAG["Value"]}]}}
    jobs: list[dict] = []
    while limit is None or len(jobs) < limit:
        page = client.search(**query, MaxResults=100 if limit is None else min(100, limit - len(jobs)))
        jobs += [result["TrainingJob"] for result in page.get("Results", [])]
        if not page.get("NextToken"):
            break
        query["NextToken"] = page["NextToken"]
    jobs.sort(key=lambda job: job["CreationTime"], reverse=True)
    return jobs[:limit]


def describe(boto: boto3.Session, job_name: str) -> dict:
    try:
        return boto.client("sagemaker").describe_training_job(TrainingJobName=job_name)
    except botocore.exceptions.ClientError as error:
        if error.response.get("Error", {}).get("Code") == "ValidationException":
            raise UsageError(f"no training job named {job_name!r} in {boto.region_name}") from None
        raise


def job_models(description: dict) -> str:
    """The --model a job was given (hyperparameters are JSON-encoded by the SDK)."""
    text = description.get("HyperParameters", {}).get("model", '"?"')
    with contextlib.suppress(ValueError):
        text = json.loads(text)
    return str(text)


def collected_jobs(output_dir: Path) -> set[str]:
    """Names of the jobs whose results are already in `output_dir`."""
    records, _ = results.load_all(output_dir) if output_dir.is_dir() else ([], [])
    return {record["sagemaker"]["job_name"] for record in records if (record.get("sagemaker") or {}).get("job_name")}


class CollectError(Exception):
    """A finished job's output that is there but cannot be collected (too large, corrupt, an invalid record): one
    line naming the job; nothing of that job is written."""


def collect_job(boto: boto3.Session, description: dict, output_dir: Path,
                log: Callable[[str], None] = print) -> list[Path]:
    """Bring a finished job's results JSON files (and their monitor files and --profile traces) into `output_dir`,
    with the job's time and cost added to each record, and the run's share of that cost; files already there are
    left alone. The new files; CollectError when its output archive is too large or corrupt or holds a record that
    is not valid."""
    name, status = description["TrainingJobName"], description["TrainingJobStatus"]
    if status not in ENDED:
        log(f"{name}: {status}, not finished yet; collect it when it has ended")
        return []
    bucket, prefix = parse_s3_uri(description["OutputDataConfig"]["S3OutputPath"], "S3OutputPath")
    key = "/".join(part for part in (prefix.rstrip("/"), name, "output", "output.tar.gz") if part)
    where = f"{name}: s3://{bucket}/{key}"
    with tempfile.TemporaryDirectory(prefix="hpml-collect-") as scratch:
        archive = Path(scratch) / "output.tar.gz"
        if not _download_output(boto.client("s3"), bucket, key, archive, where):
            log(f"{name}: {status}, but s3://{bucket}/{key} does not exist"
                + (f" ({description['FailureReason']})" if description.get("FailureReason") else ""))
            return []
        found = _results_files(archive, where, lambda line: log(f"{name}: {line}"))
    return _write_collected(found, description, output_dir, log)


def _download_output(s3: botocore.client.BaseClient, bucket: str, key: str, archive: Path, where: str) -> bool:
    """Download the job's output archive into `archive`, if it is there and not too large; whether it was there."""
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as error:
        if _status(error) != 404:
            raise
        return False
    if head["ContentLength"] > MAX_OUTPUT_ARCHIVE_BYTES:
        raise CollectError(f"{where} holds {head['ContentLength']:,} bytes, more than the "
                           f"{MAX_OUTPUT_ARCHIVE_BYTES:,} collect downloads; nothing collected from it")
    body = s3.get_object(Bucket=bucket, Key=key, IfMatch=head["ETag"])["Body"]  # the object whose size was checked
    with open(archive, "wb") as file:
        for chunk in body.iter_chunks(1 << 20):
            file.write(chunk)
    return True


def _results_files(archive: Path, where: str, log: Callable[[str], None]) -> dict[str, bytes]:
    """The regular files directly under results/ in a job's output archive, by name, read whole before anything is
    written; each link, device or name leading out of the archive is named in a line and skipped."""
    try:
        with gzip.open(archive) as unzipped, tarfile.open(fileobj=_Bounded(unzipped, where), mode="r|") as tar:
            return _read_members(tar, where, archive.parent / "unpacked", log)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise CollectError(f"{where} is cut short or corrupt ({one_line(error)}); nothing collected from it") from None


def _read_members(tar: tarfile.TarFile, where: str, folder: Path, log: Callable[[str], None]) -> dict[str, bytes]:
    found = {}
    for count, member in enumerate(tar, start=1):
        if count > MAX_ARCHIVE_MEMBERS:
            raise CollectError(f"{where} holds more than {MAX_ARCHIVE_MEMBERS:,} files; nothing collected from it")
        parts = PurePosixPath(member.name).parts
        if _safe(member, folder, log) and member.isfile() and len(parts) == 2 and parts[0] == "results":
            if parts[1] in found:  # tar keeps the last, any other reader may take the first
                raise CollectError(f"{where} holds {member.name!r} twice; nothing collected from it")
            found[parts[1]] = tar.extractfile(member).read(member.size)
    return found


def _safe(member: tarfile.TarInfo, folder: Path, log: Callable[[str], None]) -> bool:
    """Whether an archive member may be read: a regular file or folder, its name a plain name inside `folder` (an
    empty folder, where nothing is a link); a line naming any other member."""
    if member.issym() or member.islnk():
        log(f"archive member {member.name!r} skipped: a link, not followed")
        return False
    if not (member.isfile() or member.isdir()):
        log(f"archive member {member.name!r} skipped: not a regular file")
        return False
    try:
        files.inside(folder, member.name, "archive member")
    except ValueError:
        log(f"archive member {member.name!r} skipped: not a plain relative name (absolute, '..' or empty)")
        return False
    return True


class _Bounded:
    """A file read through, up to MAX_EXPANDED_BYTES; CollectError past that (`where` names the archive)."""

    def __init__(self, file: IO[bytes], where: str) -> None:
        self.file, self.where, self.left = file, where, MAX_EXPANDED_BYTES

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(self.left + 1 if size < 0 else min(size, self.left + 1))
        self.left -= len(data)
        if self.left < 0:
            raise CollectError(f"{self.where} expands to more than {MAX_EXPANDED_BYTES:,} bytes; nothing collected "
                               "from it")
        return data


def _write_collected(found: dict[str, bytes], description: dict, output_dir: Path,
                     log: Callable[[str], None]) -> list[Path]:
    """Write the job's records, and each one's companion files, once every record and path has passed its checks."""
    name = description["TrainingJobName"]
    records = _job_records(found, description, output_dir)
    if not records:
        log(f"{name}: no results JSON in the job's output")
        return []
    companions = {filename: _companions(found, record["run_id"], records, output_dir, name)
                  for filename, record in records.items()}
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, record in records.items():
        try:
            written.append(results.write_results(record, output_dir))
        except FileExistsError:
            log(f"{name}: {record['run_id']} is already in {output_dir}, left as it is")
            continue
        log(f"{name}: {record['model']} final test acc {record['final_test_acc']:.4f} -> {written[-1]}")
        for path, content in companions[filename]:
            written += _write_new_file(path, content)
    run_ids = [record["run_id"] for record in records.values()]
    for stray in sorted(set(found) - set(records)):
        if not any(stray.startswith(f"{run_id}.") for run_id in run_ids):
            log(f"{name}: results/{stray} skipped: neither a results record nor a file of one")
    return written


def _job_records(found: dict[str, bytes], description: dict, output_dir: Path) -> dict[str, dict]:
    """Each results/*.json file's record with the job's fields added, by file name; CollectError naming the first
    file that is not a valid record with a run_id that names a file in `output_dir`."""
    name = description["TrainingJobName"]
    records = {filename: _as_record(content, f"{name}: results/{filename}", output_dir)
               for filename, content in sorted(found.items()) if results.is_record_file(filename)}
    if not records:
        return {}
    fields = job_fields(description, runs=len(records))
    shares, job_cost = cost_shares(list(records.values())), fields["job_cost_usd"]
    for (filename, record), share in zip(records.items(), shares, strict=True):
        billable = fields["billable_time_s"]
        record["sagemaker"] = {**(record.get("sagemaker") or {}), **fields, "cost_share": share,
                               "cost_usd": None if job_cost is None else job_cost * share,
                               "billable_time_share_s": None if billable is None else billable * share}
        _checked(record, f"{name}: results/{filename}")
    return records


def _as_record(content: bytes, what: str, output_dir: Path) -> dict:
    try:
        record = _checked(json.loads(content), what)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors too
        raise CollectError(f"{what} is not JSON ({one_line(error)}); nothing collected") from None
    _inside(output_dir, f"{record['run_id']}.json", what)
    return record


def _checked(record: object, what: str) -> dict:
    """The record if it is valid and can be written (no NaN); CollectError naming `what` otherwise."""
    try:
        json.dumps(results.validate_record(record), allow_nan=False)
    except ValueError as error:
        raise CollectError(f"{what} is not a valid results record ({one_line(error)}); nothing collected") from None
    return record


def _companions(found: dict[str, bytes], run_id: str, records: dict[str, dict], output_dir: Path,
                name: str) -> list[tuple[Path, bytes]]:
    """The files of a run beside its record (its monitor samples, its --profile traces), each with the path it is
    written to."""
    return [(_inside(output_dir, companion, f"{name}: results/{companion}"), content)
            for companion, content in found.items() if companion.startswith(f"{run_id}.") and companion not in records]


def _inside(output_dir: Path, filename: str, what: str) -> Path:
    try:
        return files.inside(output_dir, filename, "file name")
    except ValueError as error:
        raise CollectError(f"{what}: {error}; nothing collected") from None


def job_fields(description: dict, runs: int) -> dict:
    """What a results record gets to know about the job that ran it: where, how long, what it cost."""
    bill = prices.job_bill(description)
    del bill["estimated_cost_usd"]  # the job has ended: cost_usd is the figure
    job_cost = bill.pop("cost_usd")
    return {
        "job_name": description["TrainingJobName"],
        "region": description["TrainingJobArn"].split(":")[3],
        "status": description["TrainingJobStatus"],
        "training_image": description.get("AlgorithmSpecification", {}).get("TrainingImage"),
        **bill,
        "job_cost_usd": job_cost,
        "runs_in_job": runs,  # job_cost_usd is the whole job's: it trained this many runs one after another
        "collected_at": results.utc_now(),
    }


def cost_shares(records: list[dict]) -> list[float]:
    """Each run's fraction of its job's bill: its share of the runs' total_wall_time_s (they ran one after another),
    or equal shares when a run lacks a positive one."""
    walls = [record.get("total_wall_time_s") for record in records]
    if all(isinstance(wall, (int, float)) and wall > 0 for wall in walls):
        return [wall / sum(walls) for wall in walls]
    return [1 / len(records)] * len(records)


def _write_new_file(path: Path, content: bytes) -> list[Path]:
    """Write `content` to a new file through a temporary file; [] if `path` exists (nothing is overwritten)."""
    try:
        files.write_atomic(path, lambda tmp: tmp.write_bytes(content), overwrite=False)
    except FileExistsError:
        return []
    return [path]
