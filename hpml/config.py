"""What a run is told: TrainConfig (every training flag as a plain value, with the study's defaults, validated once),
and the environment of SageMaker's training container, which gives a job its folders and says what launched it.

SageMaker's training toolkit (sagemaker-training) starts the script with SM_* variables that describe the job.
Its folders live under /opt/ml, or $SAGEMAKER_BASE_DIR where that is set. On a spot restart SageMaker restores
checkpoints/ from S3, while model/ and output/ start empty: whatever a job must hand back has to be recoverable
from checkpoints/. Only this module reads SageMaker's variables. Imports no torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from hpml.errors import UsageError
from hpml.files import shown

OPTIMIZERS = ("adadelta", "sgd", "adam")
SCHEDULES = ("none", "cosine")
DATASETS = ("cifar10", "synthetic")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "smddp", "nccl", "gloo")
LOADERS = ("device", "torch")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
GRAD_COMPRESSIONS = ("none", "fp16", "bf16", "powersgd")
CHECKPOINT_FILE = "last.pt"
DDP_BUCKET_CAP_MB = 25.0  # DistributedDataParallel's own default
MIN_SUBSET = 10  # one image per class
# Upper bounds on the size flags: far above any sensible run, low enough that a typo fails at once instead of
# allocating petabytes, spawning thousands of processes or overflowing a C timeout.
MAX_SUBSET = 50_000  # CIFAR-10's training set; the synthetic set is that size too
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 50_000
MAX_WORKERS = 256
MAX_SEED = 2**32 - 1  # numpy's legacy seeding limit
MIN_SAMPLE_INTERVAL = 0.01  # faster, sampling itself floods the output and takes a core
MAX_SAMPLE_INTERVAL = 3_600
MAX_DIST_TIMEOUT = 7 * 24 * 3_600  # a week
MAX_LR = 1e15  # as a results record allows; 1e300 overflows the float32 the optimizers turn it into
MAX_BUCKET_CAP_MB = 1_000_000.0  # a terabyte of gradients; DDP's C++ side takes the bytes as a 64-bit integer
MAX_REPEATS = 1_000  # run_study.py and bench/ --repeats
MAX_STEPS = 100_000  # bench/ --steps, --iters, --warmup; --tensorboard-every
TENSORBOARD_EVERY = 20  # steps between the per-step TensorBoard scalars (--tensorboard-every)
PROFILE_STEPS = 5  # steps --profile records (--profile-steps)
MAX_PROFILE_STEPS = 100  # a trace of more steps grows to gigabytes and opens in no viewer
MAX_PROCESSES = 256  # processes or GPUs of one node: bench/throughput.py --nproc, run_study.py --gpus-per-node
MAX_INSTANCE_COUNT = 1_000  # SageMaker instances of one job
MAX_WORLD_SIZE = MAX_PROCESSES * MAX_INSTANCE_COUNT  # processes of one data-parallel run (run_study.py)
MAX_THREADS = 4_096  # OMP_NUM_THREADS of one training process (run_study.py): more than a node has cores
MAX_JOBS = 1_000  # SageMaker jobs at once (run_study.py --max-jobs) or listed (sagemaker_submission.py list)
SAGEMAKER_MAX_RUN_S = 28 * 24 * 3_600  # the longest --max-run (and --max-wait) SageMaker accepts: 28 days


def default_data_dir() -> str:
    """$HPML_CIFAR10, else a SageMaker job's training channel, else ./data."""
    return os.path.expanduser(os.environ.get("HPML_CIFAR10") or data_channel() or "./data")


def check_data_variable() -> None:
    """UsageError naming $HPML_CIFAR10, or a SageMaker job's $SM_CHANNEL_TRAINING, when the one that gives
    default_data_dir() is empty or names no folder: a download into a folder named once in a profile, or by
    SageMaker, is never what was meant."""
    name = next(filter(os.environ.__contains__, ("HPML_CIFAR10", "SM_CHANNEL_TRAINING")), None)
    if name is None:
        return
    text = os.environ[name]
    folder = os.path.expanduser(text)
    if not text.strip():
        what = "is empty"
    elif os.path.isdir(folder):
        return
    else:
        what = f"names {shown(text)}, " + ("a file" if os.path.exists(folder) else "which does not exist")
    raise UsageError(f"environment variable {name} {what}: set it to the folder that holds CIFAR-10 "
                     "(train.npz/test.npz or cifar-10-batches-py/), or unset it and pass --data-dir")


def default_tensorboard_dir() -> str:
    """Where --tensorboard without a folder writes: inside a SageMaker job its TensorBoard output folder (uploaded to
    S3 when the job was submitted with --tensorboard), else runs (SummaryWriter's own default)."""
    return str(tensorboard_dir()) if in_job() else "runs"


def default_output_dir() -> str:
    """results, or inside a SageMaker job the folder SageMaker uploads to S3 when the job ends."""
    sagemaker_output = output_data_dir()
    return str(sagemaker_output / "results") if sagemaker_output else "results"


# The largest value of each numeric setting, and the values each setting of a few choices allows.
UPPER_BOUNDS = {"epochs": MAX_EPOCHS, "batch_size": MAX_BATCH_SIZE, "workers": MAX_WORKERS, "seed": MAX_SEED,
                "subset": MAX_SUBSET, "sample_interval": MAX_SAMPLE_INTERVAL, "dist_timeout": MAX_DIST_TIMEOUT,
                "lr": MAX_LR, "bucket_cap_mb": MAX_BUCKET_CAP_MB, "tensorboard_every": MAX_STEPS,
                "profile_steps": MAX_PROFILE_STEPS}
CHOICES = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "dataset": DATASETS, "device": DEVICES, "backend": BACKENDS,
           "loader": LOADERS, "precision": PRECISIONS, "grad_compression": GRAD_COMPRESSIONS}


def flag_of(setting: str) -> str:
    """The flag that sets `setting` (a TrainConfig field, or a flag's argparse name): batch_size -> --batch-size."""
    return "--" + setting.replace("_", "-")


@dataclass
class TrainConfig:
    models: list[str] = field(default_factory=lambda: ["resnet18"])
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "adadelta"
    schedule: str = "none"
    workers: int = 2
    drop_last: bool = True
    data_dir: str = field(default_factory=default_data_dir)
    dataset: str = "cifar10"
    subset: int | None = None
    device: str = "auto"
    seed: int = 0
    output_dir: str = field(default_factory=default_output_dir)
    quiet: bool = False
    resume: bool = False
    utilization: bool = False  # --utilization / --monitor
    sample_interval: float = 1.0
    checkpoint_dir: str | None = None
    target_acc: float | None = None  # test accuracy (0-1) whose first epoch reaching it is recorded
    tensorboard: str | None = None  # folder of TensorBoard event files, one sub-folder per run; None: off
    tensorboard_every: int = TENSORBOARD_EVERY
    profile: bool = False  # torch.profiler over --profile-steps extra steps after training: a trace per rank
    profile_steps: int = PROFILE_STEPS
    loader: str = "device"
    precision: str = "auto"
    channels_last: bool | None = None  # None: chosen per device
    compile: bool = False
    cuda_graphs: bool | None = None  # None: on for CUDA unless compiling
    # Data-parallel runs only (run_distributed.py, also as SageMaker runs it); a single-device run leaves them be.
    backend: str = "auto"
    dist_timeout: float = 300.0
    scale_lr: bool = False
    grad_compression: str = "none"
    bucket_cap_mb: float = DDP_BUCKET_CAP_MB
    static_graph: bool = False

    def validate(self) -> TrainConfig:
        """Raise UsageError naming the first bad value and what is allowed; return self."""
        self.models = parse_model_list(",".join(self.models))
        _require(self.epochs >= 1, f"--epochs must be a positive integer, got {self.epochs}")
        _require(self.batch_size >= 1, f"--batch-size must be a positive integer, got {self.batch_size}")
        _require(math.isfinite(self.lr) and self.lr > 0, f"--lr must be a positive number, got {self.lr}")
        _require(self.workers >= 0, f"--workers must be 0 or more, got {self.workers}")
        _require(self.seed >= 0, f"--seed must be 0 or more, got {self.seed}")
        _require(self.tensorboard_every >= 1,
                 f"--tensorboard-every must be a positive number of steps, got {self.tensorboard_every}")
        _require(self.profile_steps >= 1,
                 f"--profile-steps must be a positive number of steps, got {self.profile_steps}")
        _require(self.subset is None or self.subset >= MIN_SUBSET,
                 f"--subset must be at least {MIN_SUBSET} (one image per class), got {self.subset}")
        _require(math.isfinite(self.sample_interval) and self.sample_interval > 0,
                 f"--sample-interval must be a positive number of seconds, got {self.sample_interval}")
        _require(self.sample_interval >= MIN_SAMPLE_INTERVAL,
                 f"--sample-interval must be at least {MIN_SAMPLE_INTERVAL} seconds, got {self.sample_interval}")
        _require(self.target_acc is None or (math.isfinite(self.target_acc) and 0 < self.target_acc <= 1),
                 f"--target-acc must be a fraction of test images above 0 and at most 1 (e.g. 0.8), "
                 f"got {self.target_acc}")
        _require(math.isfinite(self.dist_timeout) and self.dist_timeout > 0,
                 f"--dist-timeout must be a positive number of seconds, got {self.dist_timeout}")
        _require(math.isfinite(self.bucket_cap_mb) and self.bucket_cap_mb > 0,
                 f"--bucket-cap-mb must be a positive number of megabytes, got {self.bucket_cap_mb}")
        for name, most in UPPER_BOUNDS.items():
            value = getattr(self, name) or 0
            _require(value <= most, f"{flag_of(name)} must be at most {most}, got {value}")
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            _require(value in allowed, f"{flag_of(name)} must be one of {', '.join(allowed)}, got {value!r}")
        return self

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def checkpoint_root(self) -> Path:
        """--checkpoint-dir, else a SageMaker job's checkpoint folder (synced to S3), else <output-dir>/checkpoints."""
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir)
        if in_job():
            return checkpoint_dir()
        return Path(self.output_dir) / "checkpoints"

    def checkpoint_path(self, model_name: str, mode: str, world_size: int) -> Path:
        """The checkpoint file of a run of `model_name` in `mode` ("single" or "distributed") over `world_size`."""
        return self.checkpoint_root / f"{model_name}_{mode}_w{world_size}" / CHECKPOINT_FILE


def check_grad_compression(compression: str, backend: str | None) -> None:
    """Refuse --grad-compression where the backend cannot take a DDP communication hook."""
    if compression != "none" and backend == "smddp":
        raise UsageError(f"--grad-compression {compression} is not available with the smddp backend: SMDDP "
                         "documents its AllReduce and AllGather, not DDP communication hooks; use --grad-compression "
                         "none, or --backend nccl (--distribution torchrun on SageMaker)")


def comma_list(text: str, flag: str) -> list[str]:
    """The entries of a flag's comma list, stripped; UsageError naming `flag` for an empty one ('', 'a,', 'a,,b')."""
    parts = [part.strip() for part in text.split(",")]
    _require(all(parts), f"{flag} takes a comma list without empty entries, got {text!r}")
    return parts


def parse_model_list(text: str, flag: str = "--model") -> list[str]:
    """'all', one name, or a comma list of names/aliases -> canonical names, in order, no repeats; UsageError naming
    `flag` otherwise."""
    import models  # here, not at the top: models imports torch, which scripts that only parse flags skip

    if text.strip().lower() == "all":
        return models.names()
    chosen: list[str] = []
    for name in comma_list(text, flag):
        try:
            canonical = models.canonical_name(name)
        except KeyError:
            raise UsageError(
                f"unknown model {name!r}; choose from {', '.join(models.names())}, "
                f"their aliases ({', '.join(models.ALIASES)}), a comma list, or 'all' ({flag} {text!r})"
            ) from None
        if canonical not in chosen:
            chosen.append(canonical)
    return chosen


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


# SageMaker's training container, as a job sees it.
DEFAULT_BASE_DIR = "/opt/ml"
JOB_CHECKPOINT_DIR = f"{DEFAULT_BASE_DIR}/checkpoints"  # the checkpoint_local_path submit gives the SDK
# SageMaker's default TensorBoardOutputConfig LocalPath, which submit --tensorboard gives the SDK and the job's script
JOB_TENSORBOARD_DIR = f"{DEFAULT_BASE_DIR}/output/tensorboard"
DATA_CHANNEL = "training"  # the channel submit puts the data in; the job finds it at $SM_CHANNEL_TRAINING
SMDDP_SUBMITTED = "sagemaker_distributed_dataparallel_enabled"  # the SDK's flag for distribution smddp
# SageMaker's SMDDP launcher (mpirun + smddprun, sagemaker_training/smdataparallel.py) exports one of these.
SMDDP_LAUNCH_FLAGS = ("SMDATAPARALLEL_USE_SINGLENODE", "SMDATAPARALLEL_USE_HOMOGENEOUS")
# SageMaker's variables this module reads, by kind: JSON (of this type), one line of text, a folder a run writes to.
JSON_VARIABLES = {"SM_TRAINING_ENV": dict, "SM_FRAMEWORK_PARAMS": dict, "SM_HOSTS": list}
TEXT_VARIABLES = ("TRAINING_JOB_NAME", "SM_CURRENT_HOST", "SM_CURRENT_INSTANCE_TYPE")
FOLDER_VARIABLES = ("SAGEMAKER_BASE_DIR", "SM_MODEL_DIR", "SM_OUTPUT_DATA_DIR")


def in_job() -> bool:
    """Whether SageMaker's training toolkit started this process."""
    return "SM_TRAINING_ENV" in os.environ or "SM_HOSTS" in os.environ


def base_dir() -> Path:
    return Path(os.environ.get("SAGEMAKER_BASE_DIR") or DEFAULT_BASE_DIR)


def checkpoint_dir() -> Path:
    """The folder SageMaker syncs with the job's checkpoint S3 location (JOB_CHECKPOINT_DIR under /opt/ml)."""
    return base_dir() / "checkpoints"


def tensorboard_dir() -> Path:
    """The folder SageMaker uploads to the job's TensorBoard S3 location (JOB_TENSORBOARD_DIR under /opt/ml)."""
    return base_dir() / "output" / "tensorboard"


def model_dir() -> Path | None:
    """$SM_MODEL_DIR: SageMaker uploads it as model.tar.gz when the job ends; None outside a job."""
    return Path(os.environ["SM_MODEL_DIR"]) if os.environ.get("SM_MODEL_DIR") else None


def output_data_dir() -> Path | None:
    """$SM_OUTPUT_DATA_DIR: SageMaker uploads it as output.tar.gz when the job ends; None outside a job."""
    return Path(os.environ["SM_OUTPUT_DATA_DIR"]) if os.environ.get("SM_OUTPUT_DATA_DIR") else None


def data_channel() -> str | None:
    """$SM_CHANNEL_TRAINING: where SageMaker put the job's training data channel."""
    return os.environ.get("SM_CHANNEL_TRAINING") or None


def check_variables() -> None:
    """UsageError naming the first of the variables above that is set but malformed, before a run starts: JSON of
    another kind, a text or folder that is empty, not UTF-8 or of several lines, a folder that is a file or lies under
    one, a GPU count (SM_NUM_GPUS) that is no count."""
    for name in filter(os.environ.__contains__, JSON_VARIABLES):
        _json_variable(name)
    for name in filter(os.environ.__contains__, (*TEXT_VARIABLES, *FOLDER_VARIABLES)):
        _text_variable(name)
    for name in filter(os.environ.__contains__, FOLDER_VARIABLES):
        _check_folder(name)
    gpus_per_host()


def _json_variable(name: str) -> dict | list:
    text = os.environ[name]
    kind = JSON_VARIABLES[name]
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, kind) or (kind is list and not all(isinstance(item, str) for item in value)):
        raise UsageError(f"environment variable {name} must be a JSON {'object' if kind is dict else 'list of names'}"
                         f", got {text[:80]!r}")
    return value


def _text_variable(name: str) -> str:
    text = os.environ[name]
    if not (text.strip() and text.isprintable() and shown(text) == text):  # shown: bytes not UTF-8 escaped
        raise UsageError(f"environment variable {name} must be one line of UTF-8 text, got {text[:80]!r}")
    return text


def _check_folder(name: str) -> None:
    folder = Path(os.environ[name]).expanduser()
    blocker = next((path for path in (folder, *folder.parents) if path.exists() and not path.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"environment variable {name} {shown(folder)} cannot be a folder: {shown(blocker)} is a file")


def training_env() -> dict:
    """$SM_TRAINING_ENV, SageMaker's description of the job; UsageError when it is not a JSON object."""
    return _json_variable("SM_TRAINING_ENV") if "SM_TRAINING_ENV" in os.environ else {}


def framework_params() -> dict:
    """The sagemaker_* hyperparameters the SDK adds to a job (which launcher to use, among others)."""
    if "SM_FRAMEWORK_PARAMS" in os.environ:
        return _json_variable("SM_FRAMEWORK_PARAMS")
    params = training_env().get("additional_framework_parameters")
    return params if isinstance(params, dict) else {}


def smddp_submitted() -> bool:
    """Whether the job was submitted with SageMaker's SMDDP distribution (--distribution smddp)."""
    return in_job() and str(framework_params().get(SMDDP_SUBMITTED, "")).lower() == "true"


def smddp_launched() -> bool:
    """Whether SageMaker's SMDDP launcher started this process."""
    return any(os.environ.get(flag) == "1" for flag in SMDDP_LAUNCH_FLAGS)


def gpus_per_host() -> int:
    """$SM_NUM_GPUS (UsageError naming it unless it is a count), else the job description's; 0 outside a job."""

    if "SM_NUM_GPUS" not in os.environ:
        count = training_env().get("num_gpus")
        return count if isinstance(count, int) and not isinstance(count, bool) else 0
    text = os.environ["SM_NUM_GPUS"].strip()
    if not (text.isascii() and text.isdigit() and int(text) <= MAX_PROCESSES):
        raise UsageError(f"environment variable SM_NUM_GPUS must be a number of GPUs from 0 to {MAX_PROCESSES}, "
                         f"got {os.environ['SM_NUM_GPUS']!r}")
    return int(text)


def job_info() -> dict | None:
    """The job's name, instance type and count, for the results record; None outside a job."""
    if not in_job():
        return None
    env = training_env()
    hosts = (_json_variable("SM_HOSTS") if "SM_HOSTS" in os.environ else []) or env.get("hosts", [])
    return {
        "job_name": os.environ.get("TRAINING_JOB_NAME") or env.get("job_name"),
        "instance_type": os.environ.get("SM_CURRENT_INSTANCE_TYPE") or env.get("current_instance_type"),
        "instance_count": len(hosts) or 1,
        "current_host": os.environ.get("SM_CURRENT_HOST") or env.get("current_host"),
        "gpus_per_host": gpus_per_host(),
    }
