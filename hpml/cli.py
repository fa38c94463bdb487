"""The training flags, defined once: run_hpc.py, run_distributed.py and sagemaker_submission.py share them."""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import select
import signal
import sys
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from hpml import config, files
from hpml.config import (
    BACKENDS,
    DATASETS,
    DEVICES,
    GRAD_COMPRESSIONS,
    LOADERS,
    MAX_PROFILE_STEPS,
    MAX_SAMPLE_INTERVAL,
    MIN_SAMPLE_INTERVAL,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    TrainConfig,
    check_data_variable,
    default_data_dir,
    default_output_dir,
    default_tensorboard_dir,
    parse_model_list,
)
from hpml.errors import RunStopped, Terminated, UsageError, WriteFailed, script_name

DEFAULTS = TrainConfig()
# The errors of a write to a file object (which names no file): the disk, the quota or the file-size limit is
# reached, or the file system is read-only or failing.
UNNAMED_WRITE_FAILURES = frozenset({*files.DISK_FULL, errno.EFBIG, errno.EROFS, errno.EIO})
LAUNCHED = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE")  # set in a rank that torchrun, mpirun or smddprun started


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def path_flag(text: str) -> Path:
    """The type of every file and folder flag, in every script: `~` expanded as a shell would, no empty name."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a file or folder name, got {text!r}")
    return Path(text).expanduser()


def parse_bool(text: str) -> bool:
    """Accepts the forms SageMaker hyperparameters arrive in ('True', 'false', '1', ...)."""
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class FlagGroup:
    """An argument group that adds only the flags named in `only` (every flag when None)."""

    def __init__(self, group: argparse._ArgumentGroup, only: Collection[str] | None,
                 leave_out: Collection[str] = ()) -> None:
        self.group, self.only, self.leave_out = group, only, leave_out

    def add_argument(self, *flags: str, **options: object) -> None:
        if (self.only is None or flags[0] in self.only) and flags[0] not in self.leave_out:
            self.group.add_argument(*flags, **options)


def add_switch(group: argparse._ArgumentGroup | FlagGroup, flag: str, help: str, default: bool | None = False) -> None:
    """A boolean flag: `--flag` alone means true; `--flag false` is accepted too. The help ends with the default."""
    if "(default" not in help:
        help += f" (default: {'on' if default else 'off'})"
    group.add_argument(flag, type=parse_bool, nargs="?", const=True, default=default, metavar="BOOL", help=help)


def measurement_parser(doc: str, model: str) -> ArgumentParser:
    """A bench script's parser: its docstring's first paragraph, and --model (default `model`) and --device."""
    parser = ArgumentParser(description=doc.split("\n\n")[0])
    add_training_args(parser, only={"--model", "--device"})
    parser.set_defaults(model=model)
    return parser


def add_training_args(parser: argparse.ArgumentParser, only: Collection[str] | None = None,
                      leave_out: Collection[str] = ()) -> None:
    """Every flag of one training run (or those named in `only`) but those in `leave_out`, with the study's
    defaults."""
    group = FlagGroup(parser.add_argument_group("training"), only, leave_out)
    group.add_argument("--model", default=",".join(DEFAULTS.models),
                       help="model name, a comma list, or 'all': vgg16, resnet18, mobilenetv2, shufflenetv2, "
                            "densenet121 (aliases vgg, resnet, mobilenet, shufflenet, densenet); "
                            "several models train one after another (default: %(default)s)")
    group.add_argument("--epochs", type=int, default=DEFAULTS.epochs,
                       help="passes over the training set (default: %(default)s)")
    group.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                       help="images per step per worker process (default: %(default)s)")
    group.add_argument("--lr", type=float, default=DEFAULTS.lr, help="learning rate (default: %(default)s)")
    group.add_argument("--optimizer", choices=OPTIMIZERS, default=DEFAULTS.optimizer,
                       help="adadelta, sgd (momentum 0.9, nesterov, weight decay 5e-4) or adam "
                            "(default: %(default)s)")
    group.add_argument("--schedule", choices=SCHEDULES, default=DEFAULTS.schedule,
                       help="learning-rate schedule over the epochs: none (constant) or cosine (default: %(default)s)")
    group.add_argument("--workers", type=int, default=DEFAULTS.workers,
                       help="data-loader worker processes per training process, for --loader torch (the default "
                            "device loader needs none) (default: %(default)s)")
    add_switch(group, "--drop-last", "leave out each epoch's last, partial batch (different images every epoch, as "
                                     "the order is reshuffled): a step on a few images, just before evaluation, "
                                     "knocks BatchNorm and the optimizer off course (default: on)",
               default=DEFAULTS.drop_last)
    group.add_argument("--data-dir", type=path_flag, default=None,
                       help="CIFAR-10 folder: train.npz/test.npz or cifar-10-batches-py/ (downloaded there when "
                            "absent and the network allows) (default: $HPML_CIFAR10 if set, else a SageMaker job's "
                            f"$SM_CHANNEL_TRAINING, else ./data; now {default_data_dir()})")
    group.add_argument("--dataset", choices=DATASETS, default=DEFAULTS.dataset,
                       help="cifar10, or synthetic: a generated, learnable CIFAR-shaped set for smoke runs "
                            "(default: %(default)s)")
    group.add_argument("--subset", type=int, default=None,
                       help="train on a class-stratified subset of this many images, and test on a proportional "
                            "subset of at least 1,000 (100 of synthetic data) (default: the whole set)")
    group.add_argument("--device", choices=DEVICES, default=DEFAULTS.device,
                       help="auto (CUDA when available, else CPU), cpu or cuda (default: %(default)s)")
    group.add_argument("--seed", type=int, default=DEFAULTS.seed,
                       help="seed for weights, shuffling and augmentation (default: %(default)s)")
    group.add_argument("--output-dir", type=path_flag, default=None,
                       help="folder for the results JSON files, one per run (default: results, or "
                            f"$SM_OUTPUT_DATA_DIR/results inside a SageMaker job; now {default_output_dir()})")
    group.add_argument("--target-acc", type=float, default=None, metavar="FRACTION",
                       help="record the training time at which test accuracy first reaches this fraction "
                            "(0 < FRACTION <= 1, e.g. 0.8), or that it never does: time to accuracy, the fair "
                            "speedup when a larger global batch learns more slowly (default: off)")
    add_switch(group, "--quiet", "no progress bars or per-epoch lines, only the summary (inside a SageMaker job the "
                                 "per-epoch lines stay: SageMaker reads the job's metrics from them)")
    add_switch(group, "--resume", "continue the checkpoint of the same model and settings if there is one "
                                  "(implied after a torchrun restart and inside SageMaker)")
    group.add_argument("--utilization", "--monitor", dest="utilization", type=parse_bool, nargs="?", const=True,
                       default=False, metavar="BOOL",
                       help="sample GPU (NVML) and CPU use while training: a utilization summary in the results "
                            "JSON and the samples in <run_id>.utilization.csv beside it. Under torchrun spell it "
                            "--utilization: torchrun claims options starting with --monitor for itself "
                            "(default: off)")
    group.add_argument("--sample-interval", type=float, default=DEFAULTS.sample_interval,
                       help=f"seconds between --utilization samples, {MIN_SAMPLE_INTERVAL} to {MAX_SAMPLE_INTERVAL} "
                            "(default: %(default)s)")
    group.add_argument("--tensorboard", type=path_flag, nargs="?", const=default_tensorboard_dir(), default=None,
                       metavar="DIR",
                       help="rank 0 writes TensorBoard scalars into DIR/<run_id>/: per epoch (losses, accuracies, "
                            "learning rate, images/s, times) and every --tensorboard-every steps (loss, images/s), "
                            "with the run's settings as text; needs the tensorboard package (pip install "
                            "tensorboard). DIR defaults to runs, or inside a SageMaker job to its TensorBoard "
                            f"output folder (now {default_tensorboard_dir()}) (default: off)")
    group.add_argument("--tensorboard-every", type=int, default=DEFAULTS.tensorboard_every, metavar="STEPS",
                       help="steps between the per-step --tensorboard scalars (default: %(default)s)")
    add_switch(group, "--profile", "after the last epoch, train 1 + --profile-steps more steps under torch.profiler "
                                   "on every rank (the first warms the profiler up): each rank writes a Chrome trace "
                                   "<run_id>.rank<N>.trace.json beside the results (open it in ui.perfetto.dev or "
                                   "TensorBoard), and the results gain the mean step's breakdown: forward+backward, "
                                   "optimizer, data, and gradient communication in total and exposed (not hidden "
                                   "behind computation). The extra steps come after the timed epochs and their "
                                   "evaluation, so epoch times, images/s and accuracies leave the profiler's slowdown "
                                   "out, and they change no saved weights")
    group.add_argument("--profile-steps", type=int, default=DEFAULTS.profile_steps, metavar="STEPS",
                       help=f"steps --profile records, at most {MAX_PROFILE_STEPS} (default: %(default)s)")
    group.add_argument("--checkpoint-dir", type=path_flag, default=None,
                       help="folder for checkpoints, one sub-folder per run, written every epoch and on "
                            "Ctrl-C/SIGTERM (default: <output-dir>/checkpoints; /opt/ml/checkpoints in SageMaker)")
    fast = FlagGroup(parser.add_argument_group("speed (the defaults are the fastest settings that keep accuracy)"),
                     only, leave_out)
    fast.add_argument("--loader", choices=LOADERS, default=DEFAULTS.loader,
                      help="device: the training set lives on the device and is cropped, flipped and normalised "
                           "there in batches; torch: the classic DataLoader with --workers processes and "
                           "torchvision transforms. Both give the same images (default: %(default)s)")
    fast.add_argument("--precision", choices=PRECISIONS, default=DEFAULTS.precision,
                      help="autocast precision: fp32, bf16, or fp16 (with a gradient scaler); auto never emulates: "
                           "bf16 on GPUs of compute capability 8.0+ (A100, A10G, H100) and on CPUs with native bf16 "
                           "(AVX512-BF16/AMX), fp16 on older tensor-core GPUs (V100, T4), else fp32; the results "
                           "record the precision used (default: %(default)s)")
    add_switch(fast, "--channels-last", "NHWC memory layout for the model and batches (default: on)", default=None)
    add_switch(fast, "--compile", "torch.compile the model instead of CUDA graphs (slow first steps; slower than "
                                  "the defaults where measured: see bench/README.md)")
    add_switch(fast, "--cuda-graphs", "CUDA only: capture the model's forward and backward once as CUDA graphs and "
                                      "replay them every full batch, so the GPU is not left waiting on Python "
                                      "(default: on for one CUDA process unless --compile; off under DDP, where a "
                                      "graphed backward would hold every gradient all-reduce back until it ends. "
                                      "run_study.py gives all its cells one setting)", default=None)


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """Flags of a data-parallel run on top of the training flags."""
    group = parser.add_argument_group("distributed")
    group.add_argument("--backend", choices=BACKENDS, default=DEFAULTS.backend,
                       help="torch.distributed backend: auto picks smddp inside SageMaker when the SMDDP library "
                            "is there, else nccl on CUDA, else gloo (default: %(default)s)")
    group.add_argument("--dist-timeout", type=float, default=DEFAULTS.dist_timeout,
                       help="seconds a rank waits for the others (set-up and each collective) before the job "
                            "fails instead of hanging (default: %(default)s)")
    add_switch(group, "--scale-lr", "multiply --lr by the world size (then runs of different sizes no longer "
                                    "compare like for like)")
    group.add_argument("--grad-compression", choices=GRAD_COMPRESSIONS, default=DEFAULTS.grad_compression,
                       help="how DDP sends gradients, through PyTorch's DDP communication hooks: none (fp32 "
                            "all-reduce), fp16 or bf16 (half the bytes, cast back after), powersgd (a rank-1 "
                            "approximation with error feedback, from the third step) (default: %(default)s)")
    add_switch(group, "--static-graph", "tell DDP the model runs the same graph every step, so it can skip "
                                        "per-step bookkeeping")
    group.add_argument("--bucket-cap-mb", type=float, default=DEFAULTS.bucket_cap_mb,
                       help="size of DDP's gradient buckets: smaller ones start sending earlier in the backward "
                            "pass, larger ones make fewer calls (default: %(default)s)")


def add_aws_flags(group: argparse._ActionsContainer) -> None:
    """Where AWS calls go: sagemaker_submission.py's commands and run_study.py --where sagemaker."""
    group.add_argument("--region", help="AWS region (default: AWS_REGION, or the AWS profile's region)")
    group.add_argument("--aws-profile", help="AWS profile from ~/.aws/config (default: AWS_PROFILE, or the default "
                                             "one)")


def flag_values(cfg: TrainConfig, distributed: bool) -> dict[str, str]:
    """Every training flag (and with `distributed` every data-parallel flag) set to cfg's value, as flag name
    without dashes -> the text the flag parses back; flags whose value is None are left out."""
    flags = argparse.ArgumentParser(add_help=False)
    add_training_args(flags)
    if distributed:
        add_distributed_args(flags)
    values = {}
    for name in vars(flags.parse_args([])):
        value = ",".join(cfg.models) if name == "model" else getattr(cfg, name)
        if value is not None:
            values[name.replace("_", "-")] = str(value).lower() if isinstance(value, bool) else str(value)
    return values


def count(number: int, noun: str) -> str:
    """'1 run', '2 runs': a number and a regular noun in agreement."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def require_positive(args: argparse.Namespace, *names: str) -> None:
    """UsageError naming the first of these integer flags that is below 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise UsageError(f"{config.flag_of(name)} must be a positive integer, got {getattr(args, name)}")


def require_at_most(args: argparse.Namespace, **bounds: float) -> None:
    """UsageError naming the first of these flags whose value (when set) is above its bound, or not a finite number:
    a typo, refused before it turns into hours of work or a petabyte allocation."""
    for name, most in bounds.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value <= most):
            raise UsageError(f"{config.flag_of(name)} must be at most {most}, got {value}")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A validated TrainConfig from parsed flags; UsageError on a bad value, or on a variable of the environment
    that the run would read (SageMaker's, or the one naming the data folder when --data-dir does not)."""
    config.check_variables()
    if args.data_dir is None and args.dataset == "cifar10":
        check_data_variable()
    values = {key: value for key, value in vars(args).items() if key in TrainConfig.__dataclass_fields__}
    flag = "--models" if "models" in values else "--model"  # run_study.py names its list --models
    values["models"] = parse_model_list(args.model, flag)
    values.update({key: str(value) for key, value in values.items() if isinstance(value, Path)})
    for unset in [key for key in ("data_dir", "output_dir") if values.get(key) is None]:
        del values[unset]
    return TrainConfig(**values).validate()


def stdout_unread() -> bool:
    """Whether the reader of stdout went away (`| head` has read its lines): a pipe no one reads polls as an error."""
    poller = select.poll()
    poller.register(sys.stdout.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def run_script(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run a script's main(argv): a UsageError becomes one line on stderr and exit code 2; a failed write (a
    WriteFailed, or an OSError about a file: file_error_line) one line and exit code 1; Ctrl-C or SIGTERM one line
    and exit code 130 or 143, once `with` and `finally` blocks have removed their temp files and scratch folders; a
    closed stdout nothing more and exit code 141 (128 + SIGPIPE, as a shell reports such a tool)."""
    try:
        with terminate_like_ctrl_c():
            code = main(argv)
            sys.stdout.flush()  # here, where a reader that went away is caught, not as Python exits
    except BrokenPipeError:
        if not stdout_unread():
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for Python's own flush as it exits
        code = 128 + signal.SIGPIPE
    except UsageError as error:
        print(f"{script_name()}: error: {error}", file=sys.stderr)
        code = 2
    except WriteFailed as error:
        print(f"{script_name()}: error: {error}", file=sys.stderr)
        code = 1
    except RunStopped as stop:
        print(f"{script_name()}: {stop}", file=sys.stderr)
        code = stop.exit_code
    except (KeyboardInterrupt, ImportError) as stop:
        interrupt = stop if isinstance(stop, KeyboardInterrupt) else stop.__cause__  # an import of a C extension
        if not isinstance(interrupt, KeyboardInterrupt):  # that a signal cut short: "initialization failed"
            raise
        terminated = isinstance(interrupt, Terminated)
        print(f"{script_name()}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        code = 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except OSError as error:
        line = file_error_line(error)
        if line is None:
            raise
        print(f"{script_name()}: error: {line}", file=sys.stderr)
        code = 1
    sys.exit(code or 0)


@contextlib.contextmanager
def terminate_like_ctrl_c() -> Iterator[None]:
    """In the block, SIGTERM raises Terminated where Ctrl-C raises KeyboardInterrupt, so that write_atomic's temp
    file or collect's downloaded archive is removed before the script ends. Training checkpoints on SIGTERM instead
    (experiment.stop_on_signals), and a study stops its cell (study.CellSignals). A rank that a launcher started keeps
    the default: the launcher stops its ranks with SIGTERM, and one waiting in a collective would not act on it until
    the collective ended."""
    def terminate(signum: int, frame: object) -> NoReturn:
        raise Terminated

    if any(name in os.environ for name in LAUNCHED) or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def file_error_line(error: OSError) -> str | None:
    """An OSError about a file (a read-only folder, a full disk, a file-size limit, a name too long) as one line,
    files.cannot_write's: the file and the cause; a write that failed on a file object, which names none, by its cause
    alone. None for an OSError of neither kind (a socket's, one a library raised with a message only): a traceback
    tells more there. What reaches here is a write: the scripts read their inputs through checks of their own."""
    if error.filename is None:
        return f"a write failed: {error.strerror}" if error.errno in UNNAMED_WRITE_FAILURES else None
    return files.cannot_write(" -> ".join(os.fsdecode(name) for name in (error.filename, error.filename2)
                                          if name is not None), error)
