"""One experiment: check inputs, load the data once, train each chosen model, write a results file each."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import checkpoint, data, files, monitor, profiling, results, speed, tensorboard_log, train
from .config import TrainConfig, check_grad_compression
from .dist import World
from .errors import one_line


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
                record = train.fit(cfg, name, world, images, log, stop_requested)
            if record is not None and utilization is not None:
                add_utilization(record, utilization, world, cfg.output_dir)
            if record is not None and world.is_main:
                written.append(finish(record, cfg.output_dir, log))
    return written


def check_paths(cfg: TrainConfig, world: World) -> None:
    """Refuse before training a folder that cannot be written (or --tensorboard without its package), or a file the
    file system cannot name (the longest the run writes): a run's id is as long as results.new_run_id makes it."""
    if cfg.tensorboard:
        tensorboard_log.check(cfg.tensorboard)
    results.check_writable(cfg.output_dir)
    checkpoint.check_writable(cfg)
    for name in cfg.models:
        run_id = results.new_run_id(name, world.mode, world.size)
        written = [f"{run_id}.json", *[f"{run_id}.utilization.csv"] * cfg.utilization,
                   *[profiling.trace_name(run_id, world.size - 1)] * cfg.profile]
        longest = max(written, key=len)
        files.check_name_fits(cfg.output_dir, longest, "results file")
        checkpoint.check_names_fit(cfg, name, world, run_id, longest)


def finish(record: dict, output_dir: str, log: Callable[[str], None]) -> Path:
    """Write a trained run's results file and mark its checkpoint finished."""
    path, outcome = write_results(record, Path(output_dir))
    samples = [Path(output_dir) / record["utilization"]["samples_csv"]] if "utilization" in record else []
    checkpoint.mark_finished(Path(record["checkpoint"]), record["run_id"], [path, *samples])
    if outcome == "written":
        log(f"{record['model']}: final test acc {record['final_test_acc']:.4f} (best {record['best_test_acc']:.4f}), "
            f"{record['total_train_time_s']:.1f}s training, {record['median_images_per_s']:.0f} img/s -> {path}")
    else:
        log(f"{record['model']}: already finished, results in {path}"
            + ("; the cut file there was written again from the checkpoint" if outcome == "replaced" else ""))
    return path


def write_results(record: dict, output_dir: Path) -> tuple[Path, str]:
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


@contextmanager
def utilization_monitor(cfg: TrainConfig, world: World, log: Callable[[str], None]) -> Iterator[monitor.Monitor | None]:
    """With --utilization, a monitor sampling this rank's own GPU (or the host alone on the CPU) during the run.

    Sampling that fails costs the run its later samples only, not its results: one line says so.
    """
    if not cfg.utilization:
        yield None
        return
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
    rows = world.gather_lists(utilization.samples)
    if world.is_main:
        csv_name = f"{record['run_id']}.utilization.csv"
        with files.write_errors_in_one_line(Path(output_dir) / csv_name):
            monitor.write_samples_csv(Path(output_dir) / csv_name, rows)
        record["utilization"] = monitor.summarize(rows, utilization.interval, nvml_error=utilization.nvml_error,
                                                  samples_csv=csv_name)


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


def load_dataset_once_per_node(cfg: TrainConfig, world: World) -> data.ImageSet:
    """Every rank loads the data; local rank 0 goes first, so a download happens once per node."""
    if world.local_rank != 0:
        world.barrier()
    images = data.load_dataset(cfg)
    if world.local_rank == 0:
        world.barrier()
    return images
