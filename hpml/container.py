"""SageMaker's training container, as a job sees it: its folders, its variables, and what it launched.

SageMaker's training toolkit (sagemaker-training) starts the script with SM_* variables that describe the job.
Its folders live under /opt/ml, or $SAGEMAKER_BASE_DIR where that is set. On a spot restart SageMaker restores
checkpoints/ from S3, while model/ and output/ start empty: whatever a job must hand back has to be recoverable
from checkpoints/. Only this module reads SageMaker's variables; it imports no torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import UsageError
from .files import shown

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
    from .config import MAX_PROCESSES  # here: config imports this module

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
