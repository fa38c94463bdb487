"""THE training loop, in the order a run goes: run_models checks the paths, loads the data once and trains each model
of a config in turn, one results file each; fit trains one model for its epochs and keeps its RunLog, which the
checkpoint saves and the results record is built from; a Trainer is one model set up to train (the bench scripts time
its train_epoch directly); train_steps and evaluate_batches are the steps themselves.

--utilization, --profile and --tensorboard load their modules (monitor, profiling, tensorboard_log) only when given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import models
from hpml import config, data, files, results
from hpml.config import TrainConfig, check_grad_compression
from hpml.data import ImageSet
from hpml.errors import RunStopped, UsageError, one_line
from hpml.training import checkpoint, dist, speed
from hpml.training.dist import World
from hpml.training.speed import IMAGE_SIZE, BatchPlan, EvalBatches, make_train_batches, memory_format

if TYPE_CHECKING:
    from hpml import monitor
    from hpml.training import tensorboard_log

CHECK_EVERY = 10  # steps between checks for a non-finite loss, and between the ranks' agreements on a stop


def run_models(cfg: TrainConfig, world: World, log: Callable[[str], None] = print) -> list[Path]:
    """Train every model in cfg.models in turn; rank 0 writes one results JSON per model."""
    speed.resolve(cfg, world.device, world.size)  # refuse speed settings this device cannot run before the data loads
    check_grad_compression(cfg.grad_compression, world.backend)
    if world.is_main:
        check_paths(cfg, world)
    images = load_dataset_once_per_node(cfg, world)
    if world.is_main and not cfg.quiet:
        log(f"data: {images.description}; {len(images.train_labels)} train / {len(images.test_labels)} test images")
    written = []
    with stop_on_signals() as stop_requested:
        for name in cfg.models:
            with utilization_monitor(cfg, world, log) as utilization:
                record = fit(cfg, name, world, images, log, stop_requested)
            if record is not None and utilization is not None:
                add_utilization(record, utilization, world, cfg.output_dir)
            if record is not None and world.is_main:
                written.append(finish(record, cfg.output_dir, log))
    return written


def check_paths(cfg: TrainConfig, world: World) -> None:
    """Refuse before training a folder that cannot be written (or --tensorboard without its package), or a file the
    file system cannot name (the longest the run writes): a run's id is as long as results.new_run_id makes it."""
    if cfg.tensorboard:
        from hpml.training import tensorboard_log

        tensorboard_log.check(cfg.tensorboard)
    results.check_output_folder(cfg.output_dir)
    checkpoint.check_folders_writable(cfg)
    for name in cfg.models:
        run_id = results.new_run_id(name, world.mode, world.size)
        written = [f"{run_id}.json", *[f"{run_id}.utilization.csv"] * cfg.utilization,
                   *[results.trace_name(run_id, world.size - 1)] * cfg.profile]
        longest = max(written, key=len)
        files.check_name_fits(cfg.output_dir, longest, "results file")
        checkpoint.check_names_fit(cfg, name, world, run_id, longest)


def load_dataset_once_per_node(cfg: TrainConfig, world: World) -> data.ImageSet:
    """Every rank loads the data; local rank 0 goes first, so a download happens once per node."""
    if world.local_rank != 0:
        world.barrier()
    images = data.load_dataset(cfg)
    if world.local_rank == 0:
        world.barrier()
    return images


@contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    """SIGINT and SIGTERM (SageMaker's warning before a spot reclaim) ask training to checkpoint and stop.

    A second Ctrl-C stops at once.
    """
    requested = threading.Event()

    def handle(signum: int, frame: object) -> None:
        if requested.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested.set()

    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return
    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested.is_set
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def utilization_monitor(cfg: TrainConfig, world: World, log: Callable[[str], None]) -> Iterator[monitor.Monitor | None]:
    """With --utilization, a monitor sampling this rank's own GPU (or the host alone on the CPU) during the run.

    Sampling that fails costs the run its later samples only, not its results: one line says so.
    """
    if not cfg.utilization:
        yield None
        return
    from hpml import monitor

    sampling = monitor.Monitor(cfg.sample_interval, gpu_indices=monitor.device_gpus(world.device), rank=world.rank)
    sampling.start()
    try:
        yield sampling
    finally:
        try:
            sampling.stop()
        except Exception as error:
            log(f"utilization sampling stopped early on rank {world.rank} ({type(error).__name__}: "
                f"{one_line(error)}); the results keep the samples taken before")


def add_utilization(record: dict, utilization: monitor.Monitor, world: World, output_dir: str) -> None:
    """Gather every rank's samples on rank 0: the summary goes into the record, the rows into a CSV beside it."""
    from hpml import monitor

    rows = world.gather_lists(utilization.samples)
    if world.is_main:
        csv_name = f"{record['run_id']}.utilization.csv"
        with files.write_errors_in_one_line(Path(output_dir) / csv_name):
            monitor.write_samples_csv(Path(output_dir) / csv_name, rows)
        record["utilization"] = monitor.summarize(rows, utilization.interval, nvml_error=utilization.nvml_error,
                                                  samples_csv=csv_name)


def finish(record: dict, output_dir: str, log: Callable[[str], None]) -> Path:
    """Write a trained run's results file and mark its checkpoint finished."""
    path, outcome = write_or_keep(record, Path(output_dir))
    samples = [Path(output_dir) / record["utilization"]["samples_csv"]] if "utilization" in record else []
    checkpoint.mark_finished(Path(record["checkpoint"]), record["run_id"], [path, *samples])
    if outcome == "written":
        log(f"{record['model']}: final test acc {record['final_test_acc']:.4f} (best {record['best_test_acc']:.4f}), "
            f"{record['total_train_time_s']:.1f}s training, {record['median_images_per_s']:.0f} img/s -> {path}")
    else:
        log(f"{record['model']}: already finished, results in {path}"
            + ("; the cut file there was written again from the checkpoint" if outcome == "replaced" else ""))
    return path


def write_or_keep(record: dict, output_dir: Path) -> tuple[Path, str]:
    """Write <output_dir>/<run_id>.json: "written"; keep this run's whole record found there (another attempt at the
    run wrote it meanwhile): "kept"; or replace a cut one: "replaced". Another run's record there is refused."""
    path = output_dir / f"{record['run_id']}.json"
    hint = f"; the checkpoint {record['checkpoint']} is kept: rerun with --resume to write the results"
    with files.write_errors_in_one_line(path, hint):
        try:
            return results.write_results(record, output_dir), "written"
        except FileExistsError:
            if checkpoint.own_record(path, record["run_id"]) is not None:
                return path, "kept"
            return results.write_json_atomic(path, record), "replaced"


def fit(cfg: TrainConfig, model_name: str, world: World, images: ImageSet, log: Callable[[str], None] = print,
        stop_requested: Callable[[], bool] = lambda: False) -> dict | None:
    """Train `model_name` for cfg.epochs in `world`, evaluating and checkpointing every epoch.

    Returns the results record, or None when --resume finds this run already finished. Raises RunStopped
    after saving a checkpoint when a signal arrives, and when the loss stops being finite.
    """
    run_log = RunLog.new(model_name, world)
    saved = checkpoint.RunCheckpoint(cfg, model_name, world, resume=resuming(cfg))
    if saved.finished:  # checked before the Trainer is built: skipping a finished run sets nothing up
        saved.restore_finished(Path(cfg.output_dir), log)
        return None
    if saved.run is not None:
        run_log.resume(saved.run)
    setup_start = time.perf_counter()
    trainer = Trainer(cfg, model_name, world, images)
    saved.start(trainer.load_state_dict, log)
    run_log.setup_time_s += time.perf_counter() - setup_start
    control = StepControl(world, stop_requested)
    with saved, tensorboard_scalars(cfg, model_name, world, run_log, len(trainer.train_batches)) as scalars:
        for epoch in range(run_log.epochs_done + 1, cfg.epochs + 1):
            epoch_lr, partial = trainer.current_lr, rank_share(run_log.partial, world)
            if scalars:
                scalars.start_epoch(epoch, partial)
            with epoch_progress(cfg, world, model_name, epoch, len(trainer.train_batches)) as progress:
                train = trainer.train_epoch(epoch, progress, control, partial, scalars.after_step if scalars else None)
            if train["stopped"] == "diverged":
                raise RunStopped(f"{model_name}: the training loss became NaN or infinite in epoch {epoch}; stopped "
                                 f"({saved.last_good(run_log.epochs_done)}); try a lower --lr or --precision fp32",
                                 exit_code=3, agreed=True)
            if train["stopped"] == "stop":
                run_log.partial = summed_over_ranks(train, world)
                run_log.save_to(saved, trainer.state_dict)
                saved.writer.wait()
                raise RunStopped(f"{model_name}: stopped by a signal at step {train['steps']} of epoch {epoch}; "
                                 f"checkpoint saved to {saved.path}; rerun with --resume to continue", exit_code=130,
                                 agreed=True)
            eval_start = time.perf_counter()
            test = trainer.evaluate()
            metrics = epoch_metrics(epoch, epoch_lr, train, test, time.perf_counter() - eval_start, world)
            run_log.end_epoch(metrics)
            run_log.save_to(saved, trainer.state_dict)
            if scalars:
                scalars.end_epoch(metrics)
            if world.is_main and (not cfg.quiet or config.in_job()):  # SageMaker reads the job's metrics from it
                log(format_epoch(model_name, cfg.epochs, metrics))
                sys.stdout.flush()  # a job's stdout is a pipe: the line, and so the metric, arrives with the epoch
            if epoch < cfg.epochs and control.stop_agreed():
                saved.writer.wait()
                raise RunStopped(f"{model_name}: stopped by a signal after epoch {epoch}; checkpoint saved to "
                                 f"{saved.path}; rerun with --resume to continue", exit_code=130, agreed=True)
    record = results.build_record(model_name, run_log.as_dict(), cfg.as_dict(), world.describe(), trainer.describe(),
                                  images.summary(), results.environment(world.device), run_log.total_wall_time_s(),
                                  str(saved.path))
    if world.is_main:
        checkpoint.save_final_weights(trainer.model.state_dict(), record["run_id"])
    if cfg.profile:  # after every figure above is taken and the weights are saved: its steps change neither
        from hpml.training import profiling

        record["profile"] = profiling.profile_window(trainer, record["run_id"])
    return record


def resuming(cfg: TrainConfig) -> bool:
    """--resume, or implied: a torchrun restart after a failure, or a SageMaker job (spot interruptions)."""
    return cfg.resume or dist.restart_count() > 0 or config.in_job()


def tensorboard_scalars(cfg: TrainConfig, model_name: str, world: World, run_log: RunLog,
                        steps_per_epoch: int) -> contextlib.AbstractContextManager[tensorboard_log.RunScalars | None]:
    """--tensorboard's writer for this run, on rank 0 (None on the others, and without the flag)."""
    if not (cfg.tensorboard and world.is_main):
        return contextlib.nullcontext()
    from hpml.training import tensorboard_log

    partial = run_log.partial
    steps_done = run_log.epochs_done * steps_per_epoch + (partial["steps"] if partial else 0)
    settings = {"model": model_name, "run_id": run_log.run_id, **cfg.as_dict(), **world.describe()}
    return tensorboard_log.run_scalars(cfg.tensorboard, run_log.run_id, settings, cfg.tensorboard_every,
                                       steps_per_epoch, world.size, steps_done)


def epoch_progress(cfg: TrainConfig, world: World, model_name: str, epoch: int, steps: int) -> tqdm:
    """A progress bar over one epoch's steps, on rank 0 when it writes to a terminal."""
    show = world.is_main and not cfg.quiet and sys.stderr.isatty()
    return tqdm(total=steps, desc=f"{model_name} {epoch}/{cfg.epochs}", unit="batch", leave=False, disable=not show,
                dynamic_ncols=True)


def rank_share(partial: dict | None, world: World) -> dict | None:
    """What this rank goes on from in a resumed epoch: rank 0 from the sums over every rank, the others from none,
    so that the epoch's sums over ranks come out as they would have without the stop."""
    if partial is None or world.is_main:
        return partial
    return {**partial, "loss_sum": 0.0, "correct": 0, "images": 0}


def summed_over_ranks(train: dict, world: World) -> dict:
    """A stopped epoch's position, and its sums over every rank: what the run log keeps of it (rank 0 saves it)."""
    loss_sum, correct, images = world.all_reduce([train["loss_sum"], train["correct"], train["images"]])
    summed = {**train, "loss_sum": loss_sum, "correct": round(correct), "images": round(images)}
    return {name: summed[name] for name in checkpoint.PARTIAL_FIELDS}


def epoch_metrics(epoch: int, lr: float, train: dict, test: dict, eval_time: float, world: World) -> dict:
    """One epoch's metrics over all ranks: counts summed, times of the slowest rank (compute time: the longest of
    each rank's epoch time less its own data time)."""
    loss_sum, correct, images, test_loss, test_correct, test_images = world.all_reduce([
        train["loss_sum"], train["correct"], train["images"], test["loss_sum"], test["correct"], test["images"],
    ])
    own_compute_time = max(train["epoch_time_s"] - train["data_time_s"], 0.0)
    epoch_time, data_time, compute_time, eval_time = world.all_reduce(
        [train["epoch_time_s"], train["data_time_s"], own_compute_time, eval_time], op="max")
    return {
        "epoch": epoch,
        "lr": lr,
        "train_loss": loss_sum / images,
        "train_acc": correct / images,
        "test_loss": test_loss / test_images,
        "test_acc": test_correct / test_images,
        "epoch_time_s": epoch_time,
        "data_time_s": data_time,
        "compute_time_s": compute_time,
        "eval_time_s": eval_time,
        "images_per_s": images / epoch_time,
        "train_images": int(images),
        "test_images": int(test_images),
    }


def format_epoch(model_name: str, total_epochs: int, m: dict) -> str:
    return (f"{model_name} epoch {m['epoch']}/{total_epochs}: train loss {m['train_loss']:.4f} "
            f"acc {m['train_acc']:.4f} | test loss {m['test_loss']:.4f} acc {m['test_acc']:.4f} | "
            f"{m['epoch_time_s']:.1f}s ({m['data_time_s']:.1f}s data) {m['images_per_s']:.0f} img/s")


@dataclasses.dataclass
class RunLog:
    """What a run has done so far, which its results record is built from: its id and start, the metrics of the
    epochs done, a stopped epoch's position and sums over ranks (`partial`, checkpoint.PARTIAL_FIELDS), and the times
    banked over its attempts. The checkpoint saves it (as_dict) and a resumed run goes on from it."""

    run_id: str
    started_at: str
    epochs: list[dict] = dataclasses.field(default_factory=list)
    partial: dict | None = None
    resumes: int = 0
    wall_time_s: float = 0.0  # banked at each checkpoint; total_wall_time_s() adds the time since
    setup_time_s: float = 0.0
    checkpoint_time_s: float = 0.0  # how long training waited for checkpoints to be handed to their writer

    def __post_init__(self) -> None:
        self.clock = time.perf_counter()  # when the wall time was last banked

    @classmethod
    def new(cls, model_name: str, world: World) -> RunLog:
        return cls(results.new_run_id(model_name, world.mode, world.size), results.utc_now())

    def resume(self, saved: dict) -> None:
        """Go on from the run log an earlier attempt saved (a checkpoint's "run" part): one resume more."""
        for field in dataclasses.fields(self):
            setattr(self, field.name, saved.get(field.name, getattr(self, field.name)))
        self.resumes += 1

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def epochs_done(self) -> int:
        return len(self.epochs)

    def total_wall_time_s(self) -> float:
        return self.wall_time_s + time.perf_counter() - self.clock

    def end_epoch(self, metrics: dict) -> None:
        self.epochs.append(metrics)
        self.partial = None

    def save_to(self, saved: checkpoint.RunCheckpoint, trainer_state: Callable[[], dict]) -> None:
        """Bank the wall time and have the checkpoint save the log with the trainer's state."""
        self.wall_time_s, self.clock = self.total_wall_time_s(), time.perf_counter()
        saved.save(self.as_dict(), trainer_state)
        self.checkpoint_time_s += time.perf_counter() - self.clock


class Trainer:
    """One model set up to train in a world: weights, optimizer, schedule, batches and speed settings."""

    def __init__(self, cfg: TrainConfig, model_name: str, world: World, images: ImageSet) -> None:
        self.cfg, self.world = cfg, world
        device = world.device
        self.speed = speed.resolve(cfg, device, world.size)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        seed_all(cfg.seed)
        self.model = speed.prepare_model(models.build(model_name).to(device), self.speed)
        self.params = sum(p.numel() for p in self.model.parameters())
        plan = BatchPlan(cfg.batch_size, cfg.seed, world.rank, world.size, cfg.drop_last)
        self.train_batches = make_train_batches(images, plan, device, self.speed.loader, self.speed.channels_last,
                                                cfg.workers)
        if self.train_batches.epoch_size == 0:
            raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {len(self.train_batches.sampler)} "
                             "training images each process gets, and --drop-last leaves out the partial batch; "
                             "lower --batch-size or pass --drop-last false")
        self.eval_batches = EvalBatches(images, world.rank, world.size, device, self.speed.channels_last)
        self.speed.cuda_graphs &= self.train_batches.epoch_size >= cfg.batch_size  # a full batch to replay
        step_model = self.model
        if self.speed.cuda_graphs:
            batch = torch.randn(cfg.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
            batch = batch.contiguous(memory_format=memory_format(self.speed.channels_last))
            step_model = speed.GraphedModel(self.model, batch, speed.autocast(self.speed, device))
        train_model = wrap_for_world(step_model, world, cfg)
        self.train_model = torch.compile(train_model) if self.speed.compile else train_model
        self.lr = cfg.lr * world.size if cfg.scale_lr else cfg.lr
        self.optimizer = make_optimizer(cfg, self.model.parameters(), self.lr)
        self.scheduler = make_scheduler(cfg, self.optimizer)
        self.scaler = speed.grad_scaler(self.speed, device)

    def describe(self) -> dict:
        """The trainer's fields of a results record."""
        return {"lr": self.lr, "speed": self.speed.as_dict(), "params": self.params}

    @property
    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_epoch(self, epoch: int, progress: tqdm, control: StepControl | None = None,
                    partial: dict | None = None, on_step: Callable[[int, Tensor, int], None] | None = None) -> dict:
        """Train one epoch (the rest of it after `partial`); the schedule steps when the epoch completes."""
        seed_all(self.cfg.seed, epoch, self.world.rank)
        self.train_batches.set_epoch(epoch, skip_batches=partial["steps"] if partial else 0)
        stats = train_steps(self.train_model, self.optimizer, self.train_batches, self.world.device, progress,
                            speed.autocast(self.speed, self.world.device), self.scaler, control, partial, on_step)
        if not stats["stopped"]:
            with warnings.catch_warnings():  # an epoch resumed after its last step takes no optimizer step
                warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"), UserWarning)
                self.scheduler.step()
        return stats

    def evaluate(self) -> dict:
        return evaluate_batches(self.model, self.eval_batches, speed.autocast(self.speed, self.world.device))

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def seed_all(*seed_parts: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from one or more integers."""
    seed = int(np.random.SeedSequence(list(seed_parts)).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def wrap_for_world(model: nn.Module, world: World, cfg: TrainConfig) -> nn.Module:
    """DistributedDataParallel in a process group (gradients averaged over ranks, sent as --grad-compression
    says), else the model itself."""
    if not world.distributed:
        return model
    ddp = DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None,
                                  bucket_cap_mb=cfg.bucket_cap_mb, static_graph=cfg.static_graph)
    dist.register_grad_compression(ddp, cfg.grad_compression, cfg.seed)
    return ddp


def make_optimizer(cfg: TrainConfig, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.Adadelta(params, lr=lr)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch: cosine decay to zero over the run, or a constant rate."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


class StepControl:
    """Lets a signal or a diverging loss stop every rank at the same step, so no rank waits on the others.

    A world of one reads its stop flag after every step. Ranks of a group agree on it every CHECK_EVERY steps and
    at every epoch's end, so that a step costs no collective of its own. The loss is checked every CHECK_EVERY
    steps: reading it waits for the device.
    """

    def __init__(self, world: World, stop_requested: Callable[[], bool] = lambda: False) -> None:
        self.world, self.stop_requested = world, stop_requested

    def after_step(self, steps: int, loss_sum: Tensor) -> str | None:
        """The verdict after a step: None to go on, "stop" or "diverged"."""
        if not self.world.distributed and self.stop_requested():
            return "stop"
        return self.verdict(loss_sum) if steps % CHECK_EVERY == 0 else None

    def stop_agreed(self) -> bool:
        """Whether any rank was signalled (agreed over ranks)."""
        return self.world.all_reduce([float(self.stop_requested())])[0] > 0

    def verdict(self, loss_sum: Tensor) -> str | None:
        """None to go on, "diverged" when any rank's loss is NaN or infinite, "stop" when any rank was signalled."""
        diverged, stop = self.world.all_reduce(
            [float(not torch.isfinite(loss_sum).item()), float(self.stop_requested())])  # how many ranks
        return "diverged" if diverged else "stop" if stop else None


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[tuple[Tensor, Tensor]],
                device: torch.device, progress: tqdm, autocast: contextlib.AbstractContextManager | None = None,
                scaler: torch.amp.GradScaler | None = None, control: StepControl | None = None,
                partial: dict | None = None, on_step: Callable[[int, Tensor, int], None] | None = None) -> dict:
    """One pass over this rank's shard (or what is left of it after `partial`, a stopped epoch's sums).

    Returns sums (loss, correct, images), the steps taken, times in seconds and `stopped` (None, "stop" or
    "diverged"). data_time_s is the time the loop waited for the next batch; the epoch time is read after
    the device has finished the last step. `on_step` gets the steps, loss sum and images so far after each step.
    """
    model.train()
    autocast = autocast or contextlib.nullcontext()
    partial = partial or {}
    loss_sum = torch.tensor(partial.get("loss_sum", 0.0), dtype=torch.float64, device=device)
    correct = torch.tensor(partial.get("correct", 0), dtype=torch.int64, device=device)
    images, steps = partial.get("images", 0), partial.get("steps", 0)
    data_time, stopped = partial.get("data_time_s", 0.0), None
    synchronize(device)
    start = time.perf_counter() - partial.get("epoch_time_s", 0.0)
    batch_iter = iter(batches)
    while True:
        wait_start = time.perf_counter()
        batch = next(batch_iter, None)
        data_time += time.perf_counter() - wait_start
        if batch is None:
            break
        inputs, targets = batch
        with autocast:
            outputs = model(inputs)
            loss = F.cross_entropy(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        loss_sum += loss.detach() * len(targets)
        correct += (outputs.argmax(1) == targets).sum()
        images += len(targets)
        steps += 1
        progress.update(1)
        if on_step:
            on_step(steps, loss_sum, images)
        if not progress.disable and steps % 20 == 0:
            progress.set_postfix(loss=f"{loss_sum.item() / images:.3f}", acc=f"{correct.item() / images:.3f}")
        if control:
            stopped = control.after_step(steps, loss_sum)
            if stopped:
                break
    if control and not stopped:
        stopped = "diverged" if control.verdict(loss_sum) == "diverged" else None
    synchronize(device)
    epoch_time = time.perf_counter() - start
    return {"loss_sum": loss_sum.item(), "correct": correct.item(), "images": images, "steps": steps,
            "epoch_time_s": epoch_time, "data_time_s": data_time, "stopped": stopped}


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: EvalBatches,
                     autocast: contextlib.AbstractContextManager | None = None) -> dict:
    """Sums of loss and correct predictions over this rank's share of the test set."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=batches.targets.device)
    correct = torch.zeros((), dtype=torch.int64, device=batches.targets.device)
    for inputs, targets in batches:
        with autocast or contextlib.nullcontext():
            outputs = model(inputs)
        loss_sum += F.cross_entropy(outputs.float(), targets, reduction="sum")
        correct += (outputs.argmax(1) == targets).sum()
    return {"loss_sum": loss_sum.item(), "correct": correct.item(), "images": len(batches)}


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that a clock read afterwards measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

