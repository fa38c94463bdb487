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

DEFAULT_BASE_DIR = "/opt/ml"
JOB_CHECKPOINT_DIR = f"{DEFAULT_BASE_DIR}/checkpoints"  # the checkpoint_local_path submit gives the SDK
DATA_CHANNEL = "training"  # the channel submit puts the data in; the job finds it at $SM_CHANNEL_TRAINING
SMDDP_SUBMITTED = "sagemaker_distributed_dataparallel_enabled"  # the SDK's flag for distribution smddp
# SageMaker's SMDDP launcher (mpirun + smddprun, sagemaker_training/smdataparallel.py) exports one of these.
SMDDP_LAUNCH_FLAGS = ("SMDATAPARALLEL_USE_SINGLENODE", "SMDATAPARALLEL_USE_HOMOGENEOUS")


def in_job() -> bool:
    """Whether SageMaker's training toolkit started this process."""
    return "SM_TRAINING_ENV" in os.environ or "SM_HOSTS" in os.environ


def base_dir() -> Path:
    return Path(os.environ.get("SAGEMAKER_BASE_DIR") or DEFAULT_BASE_DIR)


def checkpoint_dir() -> Path:
    """The folder SageMaker syncs with the job's checkpoint S3 location (JOB_CHECKPOINT_DIR under /opt/ml)."""
    return base_dir() / "checkpoints"


def model_dir() -> Path | None:
    """$SM_MODEL_DIR: SageMaker uploads it as model.tar.gz when the job ends; None outside a job."""
    return Path(os.environ["SM_MODEL_DIR"]) if os.environ.get("SM_MODEL_DIR") else None


def output_data_dir() -> Path | None:
    """$SM_OUTPUT_DATA_DIR: SageMaker uploads it as output.tar.gz when the job ends; None outside a job."""
    return Path(os.environ["SM_OUTPUT_DATA_DIR"]) if os.environ.get("SM_OUTPUT_DATA_DIR") else None


def data_channel() -> str | None:
    """$SM_CHANNEL_TRAINING: where SageMaker put the job's training data channel."""
    return os.environ.get("SM_CHANNEL_TRAINING") or None


def training_env() -> dict:
    """$SM_TRAINING_ENV, SageMaker's description of the job; UsageError when it is not a JSON object."""
    text = os.environ.get("SM_TRAINING_ENV") or "{}"
    try:
        env = json.loads(text)
    except ValueError:
        env = None
    if not isinstance(env, dict):
        raise UsageError(f"environment variable SM_TRAINING_ENV must be a JSON object, got {text[:80]!r}")
    return env


def framework_params() -> dict:
    """The sagemaker_* hyperparameters the SDK adds to a job (which launcher to use, among others)."""
    try:
        params = json.loads(os.environ["SM_FRAMEWORK_PARAMS"])
    except (KeyError, ValueError):
        params = training_env().get("additional_framework_parameters")
    return params if isinstance(params, dict) else {}


def smddp_submitted() -> bool:
    """Whether the job was submitted with SageMaker's SMDDP distribution (--distribution smddp)."""
    return in_job() and str(framework_params().get(SMDDP_SUBMITTED, "")).lower() == "true"


def smddp_launched() -> bool:
    """Whether SageMaker's SMDDP launcher started this process."""
    return any(os.environ.get(flag) == "1" for flag in SMDDP_LAUNCH_FLAGS)


def gpus_per_host() -> int:
    try:
        return int(os.environ.get("SM_NUM_GPUS") or training_env().get("num_gpus") or 0)
    except ValueError:
        return 0


def job_info() -> dict | None:
    """The job's name, instance type and count, for the results record; None outside a job."""
    if not in_job():
        return None
    env = training_env()
    hosts = json.loads(os.environ.get("SM_HOSTS") or "[]") or env.get("hosts", [])
    return {
        "job_name": os.environ.get("TRAINING_JOB_NAME") or env.get("job_name"),
        "instance_type": os.environ.get("SM_CURRENT_INSTANCE_TYPE") or env.get("current_instance_type"),
        "instance_count": len(hosts) or 1,
        "current_host": os.environ.get("SM_CURRENT_HOST") or env.get("current_host"),
        "gpus_per_host": gpus_per_host(),
    }
