"""Checkpoints: one file per run, written atomically by rank 0, read back with weights_only=True.

A checkpoint holds the model, optimizer, schedule and gradient scaler, and the loop's run log: the metrics of the
epochs so far and, when a run was stopped by a signal, the position and running sums inside the epoch. Once the run
has finished, copies of its results files lie beside it, so that they can be written again where they went missing
(a SageMaker spot restart brings back the checkpoint folder, not the output folder). No random-generator state is
needed: every random stream (weights, shuffle, crops and flips) is drawn afresh from (--seed, epoch, rank) when an
epoch starts, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import shutil
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from hpml import config, files, results
from hpml.config import TrainConfig
from hpml.errors import UsageError, WriteFailed, one_line
from hpml.training.dist import World

FORMAT_VERSION = 1
FINISHED_FILE = "finished.json"  # beside last.pt once the run's results are written
RESULTS_COPIES = "results"  # beside last.pt: copies of a finished run's results files
# What must match for a checkpoint to continue this run; speed settings may differ.
IDENTITY_FIELDS = ("batch_size", "lr", "optimizer", "schedule", "epochs", "seed", "dataset", "subset", "scale_lr",
                   "drop_last")
OLDER_IDENTITY = {"drop_last": False}  # what checkpoints written before a field existed were made with
# A stopped epoch's position and running sums, enough to finish it exactly.
PARTIAL_FIELDS = ("steps", "loss_sum", "correct", "images", "epoch_time_s", "data_time_s")
# What a checkpoint holds, each part and each field of its run log ("run") with what it must be: what resuming reads
# before the trainer's state is loaded (whose own misfits load_trainer_state reports). The run log is checked after
# the identity, so that a checkpoint of other settings is named as such.
CONTENTS: dict[str, Callable[[object], bool]] = {
    "identity": lambda v: isinstance(v, dict), "run": lambda v: isinstance(v, dict),
    "trainer": lambda v: isinstance(v, dict) and isinstance(v.get("model"), dict)}
RUN_LOG: dict[str, Callable[[object], bool]] = {
    "run_id": lambda v: isinstance(v, str), "started_at": lambda v: isinstance(v, str),
    "epochs": lambda v: isinstance(v, list) and all(isinstance(epoch, dict) for epoch in v),
    "partial": lambda v: v is None or (isinstance(v, dict) and all(
        results.AMOUNT.accepts(v.get(name)) for name in PARTIAL_FIELDS)),
    "resumes": results.SIZE.accepts, "wall_time_s": results.AMOUNT.accepts, "setup_time_s": results.AMOUNT.accepts,
    "checkpoint_time_s": results.AMOUNT.accepts}


def run_path(cfg: TrainConfig, model_name: str, world: World) -> Path:
    return cfg.checkpoint_path(model_name, world.mode, world.size)


def identity(cfg: TrainConfig, model_name: str, world: World) -> dict:
    return {"model": model_name, "world_size": world.size,
            **{name: getattr(cfg, name) for name in IDENTITY_FIELDS}}


class RunCheckpoint:
    """One run's checkpoint: what an earlier attempt left in its folder, and this attempt's saves.

    It saves the loop's run log (hpml.training.loop.RunLog, as a plain dict: the checkpoint's "run" part) with the
    trainer's state, and on resume hands back the one an earlier attempt saved (`run`). Every rank reads the
    checkpoint; rank 0 writes it, in the background. Use it as a context manager around training, so that the last
    write is complete when training ends.
    """

    def __init__(self, cfg: TrainConfig, model_name: str, world: World, resume: bool) -> None:
        self.path, self.world = run_path(cfg, model_name, world), world
        # what this run writes beside its checkpoint stays in the checkpoint folder, whatever links a copied one holds
        named(cfg.checkpoint_root, f"{self.path.parent.name}/{RESULTS_COPIES}", "folder", self.path.parent)
        self.identity = identity(cfg, model_name, world)
        self.writer = BackgroundWriter()
        self.run: dict | None = None  # the run log an earlier attempt saved
        self.trainer_state: dict | None = None
        self.finished: dict | None = None  # finished.json of a run that needs no more training
        self.replacing = False  # starting afresh where an earlier run left its files
        if resume and self.path.exists():
            state = load(self.path)
            check_identity(state, self.identity, self.path)
            refuse_misfit(self.path, next((f"run.{name}" for name, fits in RUN_LOG.items()
                                           if not fits(state["run"].get(name))), ""))
            self.run, self.trainer_state = state["run"], state["trainer"]
            named(cfg.output_dir, self.run["run_id"], "run id", self.path.parent)
            self.finished = finished_run(self.path) or self.finished_unmarked(Path(cfg.output_dir))

    def finished_unmarked(self, output_dir: Path) -> dict | None:
        """A run whose whole results file is there though finished.json is missing or cut (a kill between the two
        writes), as finished.json would describe it; rank 0 looks, every rank follows."""
        run_id = self.run["run_id"]
        found = results_found(self.path, run_id, output_dir) if self.world.is_main else None
        if self.world.all_reduce([float(found is not None)], op="max")[0]:
            return found or {"run_id": run_id, "files": []}
        return None

    def restore_finished(self, output_dir: Path, log: Callable[[str], None]) -> None:
        """A finished run's results go back where they are missing (call when `finished`); training is skipped."""
        if self.world.is_main:
            restore_results(self.path, self.finished, output_dir, self.trainer_state["model"], log)
        log(f"{self.identity['model']}: already finished, results in {output_dir}; skipping")

    def start(self, load_trainer_state: Callable[[dict], None], log: Callable[[str], None]) -> None:
        """Continue the earlier attempt (its state goes to `load_trainer_state`) or begin afresh in its folder."""
        name, done = self.identity["model"], len(self.run["epochs"]) if self.run else 0
        if self.trainer_state is not None:
            try:
                load_trainer_state(self.trainer_state)
            except (RuntimeError, KeyError, ValueError, TypeError) as error:
                raise UsageError(f"checkpoint {self.path} does not fit {name} ({one_line(error, 200)}); delete it "
                                 "or use another --checkpoint-dir") from None
            partial = self.run.get("partial")  # RUN_LOG lets a checkpoint leave it out
            log(f"{name}: resuming from {self.path} after epoch {done}"
                + (f", step {partial['steps']} of epoch {done + 1}" if partial else ""))
        elif self.world.is_main:
            self.replacing = True  # an earlier run's files stay until this one writes its first checkpoint
            if self.path.exists():
                log(f"{name}: starting afresh; {self.path} will be replaced (use --resume to continue it)")
        done_by_rank = self.world.all_reduce([done, -done], op="max")
        if done_by_rank[0] != -done_by_rank[1]:
            raise UsageError(f"ranks found different checkpoints under {self.path.parent}; put --checkpoint-dir on a "
                             "folder every node shares")

    def save(self, run: dict, trainer_state: Callable[[], dict]) -> None:
        """(Rank 0) write the run log `run` with the trainer's state, in the background; a run started afresh
        first clears the finished marks of the one it replaces."""
        if self.world.is_main:
            if self.replacing:
                clear_finished(self.path)
                self.replacing = False
            self.writer.write(self.path, {"identity": self.identity, "run": run, "trainer": trainer_state()})

    def last_good(self, epochs_done: int) -> str:
        return f"the last good checkpoint, after epoch {epochs_done}, is {self.path}" if epochs_done else \
            "no checkpoint"

    def __enter__(self) -> RunCheckpoint:
        self.writer.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.writer.__exit__(*exc)


class BackgroundWriter:
    """Writes checkpoints on a thread, so that training goes on while the file is written and flushed to disk.

    write() copies the state at once (tensors are cloned where they live, in a few milliseconds); the thread
    serialises the copy through a temp file and a rename, mostly without holding the GIL. One write at a
    time: write() and wait() wait for the one before and raise its error. Use it as a context manager, so that
    the last write is complete when the block ends.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: WriteFailed | None = None

    def write(self, path: Path, state: dict) -> None:
        self.wait()
        snapshot = copy.deepcopy({"format_version": FORMAT_VERSION, **state})  # training changes the original
        self._thread = threading.Thread(target=self._write_file, args=(path, snapshot), name="checkpoint-writer")
        self._thread.start()

    def _write_file(self, path: Path, snapshot: dict) -> None:
        try:
            files.write_atomic(path, lambda tmp: save_tensors(snapshot, tmp))
        except Exception as error:  # reported to the training thread at its next wait()
            self._error = WriteFailed(files.cannot_write(f"checkpoint {path}", error))

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type: type | None, *_: object) -> None:
        if exc_type is None:
            self.wait()
        elif self._thread is not None:  # finish the write, but let the exception on its way win
            self._thread.join()


class _KeepWriteError(io.BufferedWriter):
    """A file that keeps the OSError of a failed write, which torch.save reports only as '[enforce fail at
    inline_container.cc] unexpected pos'."""

    error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return super().write(data)
        except OSError as error:
            self.error = error
            raise


def save_tensors(state: dict, path: Path) -> None:
    """torch.save into `path`; a failed write (a full disk, a file too large) raises its own OSError."""
    with _KeepWriteError(io.FileIO(path, "wb")) as file:
        try:
            torch.save(state, file)
        except RuntimeError:
            if file.error is None:
                raise
            raise file.error from None


def load(path: Path) -> dict:
    """A checkpoint's contents; UsageError naming the file when it is corrupt, truncated or foreign."""
    try:
        with files.open_regular(path) as file:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise UsageError(f"checkpoint {path} is corrupt or truncated ({one_line(error, 200)}); delete it to start "
                         "afresh") from None
    misfit = "" if isinstance(state, dict) and state.get("format_version") == FORMAT_VERSION else "format_version"
    refuse_misfit(path, misfit or next((name for name, fits in CONTENTS.items() if not fits(state.get(name))), ""))
    return state


def refuse_misfit(path: Path, misfit: str) -> None:
    """UsageError naming the part of checkpoint `path` that is missing or malformed, if any (`misfit`)."""
    if misfit:
        raise UsageError(f"checkpoint {path} is not an hpml checkpoint of format {FORMAT_VERSION} (its {misfit} is "
                         "missing or malformed); delete it or use another --checkpoint-dir")


def mark_finished(path: Path, run_id: str, written: list[Path]) -> None:
    """Keep copies of a finished run's results files beside its checkpoint, and note that it finished, so that
    --resume skips the run and can write the files again."""
    for file in written:
        with files.write_errors_in_one_line(path.with_name(RESULTS_COPIES) / file.name):
            files.copy_atomic(file, path.with_name(RESULTS_COPIES) / file.name)
    with files.write_errors_in_one_line(path.with_name(FINISHED_FILE)):
        results.write_json_atomic(path.with_name(FINISHED_FILE), {"run_id": run_id, "results_file": str(written[0]),
                                                                  "files": [file.name for file in written]})


def finished_run(path: Path) -> dict | None:
    """What finished.json says of the run whose checkpoint is `path` (run_id, results_file, files); None when it is
    missing or cut."""
    try:
        with files.open_regular(path.with_name(FINISHED_FILE)) as file:
            finished = json.loads(file.read())
    except (OSError, ValueError):
        return None
    whole = (isinstance(finished, dict) and "results_file" in finished and isinstance(finished.get("run_id"), str)
             and isinstance(finished.get("files"), list))
    return finished if whole else None


def own_record(path: Path, run_id: str) -> dict | None:
    """The whole results record of run `run_id` at `path`; None when the file is missing or cut (half a JSON, or
    this run's record short of fields). A file holding no record of this run is refused in one line: it is never
    replaced."""
    try:
        with files.open_regular(path) as file:
            record = json.loads(file.read())
    except FileNotFoundError:
        return None
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("run_id") != run_id:
        raise UsageError(f"{path} holds no results of run {run_id}; move it away and rerun with --resume")
    try:
        return results.validate_record(record)
    except ValueError:
        return None


def results_found(path: Path, run_id: str, output_dir: Path) -> dict | None:
    """finished.json's content for run `run_id` (checkpoint `path`) when its whole results file lies in `output_dir`
    or among the copies beside the checkpoint; None when neither holds it."""
    for folder in (output_dir, path.with_name(RESULTS_COPIES)):
        record = own_record(folder / f"{run_id}.json", run_id)
        if record is not None:
            samples = [record["utilization"]["samples_csv"]] if "utilization" in record else []
            return {"run_id": run_id, "results_file": str(folder / f"{run_id}.json"),
                    "files": [f"{run_id}.json", *samples]}
    return None


def named(folder: str | Path, name: object, what: str, run_folder: Path) -> Path:
    """`folder`/`name` for a name read from a checkpoint's files (see files.inside); UsageError otherwise."""
    try:
        return files.inside(folder, name, what)
    except ValueError as error:
        raise UsageError(f"refusing the checkpoint in {run_folder}: {error}; delete it or use another "
                         "--checkpoint-dir") from None


def needs_restoring(target: Path, run_id: str) -> bool:
    """Whether a finished run's results file is missing, or cut (a results JSON of this run that is not whole)."""
    return own_record(target, run_id) is None if target.suffix == ".json" else not target.exists()


def restore_results(path: Path, finished: dict, output_dir: Path, model_state: dict,
                    log: Callable[[str], None]) -> None:
    """Write a finished run's results files into `output_dir` where they are missing or cut, its finished mark where
    that is, and its final weights into a SageMaker job's model folder: a spot restart empties both folders. Every
    name finished.json gives is checked before anything is written."""
    run_id, kept_dir = finished["run_id"], path.with_name(RESULTS_COPIES)
    pairs = [(named(output_dir, name, "results file", path.parent), named(kept_dir, name, "results file", path.parent))
             for name in finished["files"]]
    weights_path(run_id)  # a bad run id is refused before anything is written
    for target, kept in pairs:
        if kept.exists() and needs_restoring(target, run_id):
            with files.write_errors_in_one_line(target):
                files.copy_atomic(kept, target)
            log(f"restored {target} from {kept}")
    if finished_run(path) is None:
        mark_finished(path, run_id, [target for target, _ in pairs if target.exists()])
    save_final_weights(model_state, run_id, overwrite=False)


def clear_finished(path: Path) -> None:
    """A run starting afresh in the folder of a finished one is not finished."""
    path.with_name(FINISHED_FILE).unlink(missing_ok=True)
    shutil.rmtree(path.with_name(RESULTS_COPIES), ignore_errors=True)


def check_identity(state: dict, expected: dict, path: Path) -> None:
    """Refuse to continue a checkpoint made with other settings, naming the first difference."""
    for name, value in expected.items():
        saved = state["identity"].get(name, OLDER_IDENTITY.get(name))
        if saved != value:
            raise UsageError(f"checkpoint {path} was made with {name} {saved!r}, this run has {value!r}; "
                             "rerun with the same settings, or use another --checkpoint-dir to start afresh")


def check_folders_writable(cfg: TrainConfig) -> None:
    """Prove the checkpoint folder, and a SageMaker job's model folder, can be written before training starts."""
    files.check_writable(cfg.checkpoint_root, "checkpoint folder")
    if config.model_dir() is not None:
        files.check_writable(config.model_dir(), "model folder")


def check_names_fit(cfg: TrainConfig, model_name: str, world: World, run_id: str, results_name: str) -> None:
    """Refuse before training a run whose files the file system cannot name: the copy of its results beside the
    checkpoint (its deepest file there) and, in a SageMaker job, its final weights."""
    files.check_name_fits(run_path(cfg, model_name, world).with_name(RESULTS_COPIES), results_name,
                          "copy of the results")
    if config.model_dir() is not None:
        files.check_name_fits(config.model_dir(), f"{run_id}.pt", "final weights")


def weights_path(run_id: str) -> Path | None:
    """$SM_MODEL_DIR/<run_id>.pt in a SageMaker job, None outside one; UsageError for a run id that is no plain name."""
    model_dir = config.model_dir()
    if model_dir is None:
        return None
    try:
        return files.inside(model_dir, f"{run_id}.pt", "weights file")
    except ValueError as error:
        raise UsageError(str(error)) from None


def save_final_weights(model_state: dict, run_id: str, overwrite: bool = True) -> Path | None:
    """In a SageMaker job, the trained weights go to $SM_MODEL_DIR, which SageMaker uploads as model.tar.gz."""
    path = weights_path(run_id)
    if path is None or (not overwrite and path.exists()):
        return path
    with files.write_errors_in_one_line(path):
        return files.write_atomic(path, lambda tmp: save_tensors(model_state, tmp))
