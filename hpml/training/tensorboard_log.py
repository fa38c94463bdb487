"""--tensorboard: a run's scalars and settings as TensorBoard event files, written by rank 0.

Everything is on one axis, the run's step (optimizer steps of one rank since the run began): the per-step scalars
every --tensorboard-every steps, and each epoch's metrics at the epoch's last step. A run writes into DIR/<run_id>/;
a resumed run keeps its run id and so its folder, and opens it with purge_step at its first new step, so what an
interrupted attempt wrote after its checkpoint is hidden rather than drawn twice. The tensorboard package is optional:
--tensorboard without it is refused before training, saying how to install it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from hpml import files
from hpml.errors import UsageError

if TYPE_CHECKING:
    from torch import Tensor
    from torch.utils.tensorboard import SummaryWriter

INSTALL = "pip install tensorboard"
# The epoch metrics (hpml.training.loop.epoch_metrics) drawn as epoch/<name>.
EPOCH_SCALARS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "images_per_s", "epoch_time_s",
                 "data_time_s", "compute_time_s", "eval_time_s")


def summary_writer_class() -> type[SummaryWriter]:
    """torch's SummaryWriter; UsageError saying how to install tensorboard where it is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise UsageError(f"--tensorboard needs the tensorboard package ({error}); install it with: {INSTALL}") from None
    return SummaryWriter


def check(folder: str) -> None:
    """Refuse --tensorboard before training when tensorboard is missing or its folder cannot be written."""
    summary_writer_class()
    files.check_writable(folder, "TensorBoard folder")


def settings_text(settings: dict) -> str:
    """The run's settings as a Markdown table, one row each."""
    rows = [f"| {name} | `{json.dumps(value)}` |" for name, value in settings.items()]
    return "\n".join(["| setting | value |", "|---|---|", *rows])


class RunScalars:
    """One run's TensorBoard writer. `steps_done` is how many steps the run had taken before this attempt."""

    def __init__(self, folder: Path, settings: dict, every: int, steps_per_epoch: int, world_size: int,
                 steps_done: int) -> None:
        self.writer = summary_writer_class()(str(folder), purge_step=steps_done + 1 if steps_done else None)
        self.writer.add_text("settings", settings_text(settings), global_step=steps_done)
        self.every, self.steps_per_epoch, self.world_size = every, steps_per_epoch, world_size
        self.offset, self.window = 0, (0.0, 0, 0.0)

    def start_epoch(self, epoch: int, partial: dict | None) -> None:
        """Begin the per-step windows of an epoch (or of its rest, after a stopped epoch's `partial` sums)."""
        self.offset = (epoch - 1) * self.steps_per_epoch
        partial = partial or {}
        self.window = (partial.get("loss_sum", 0.0), partial.get("images", 0), time.perf_counter())

    def after_step(self, steps: int, loss_sum: Tensor, images: int) -> None:
        """Called by the training loop after each step with the epoch's running sums on this rank: every `every`
        run steps, the mean loss and the images/s (this rank's × the world size) since the last such step."""
        step = self.offset + steps
        if step % self.every:
            return
        total = loss_sum.item()  # waits for the device, so the clock below covers the steps
        now = time.perf_counter()
        last_total, last_images, last_time = self.window
        self.writer.add_scalar("step/loss", (total - last_total) / (images - last_images), step)
        self.writer.add_scalar("step/images_per_s", (images - last_images) * self.world_size / (now - last_time), step)
        self.window = (total, images, now)

    def end_epoch(self, metrics: dict) -> None:
        """The epoch's metrics, at its last step; written to disk at once."""
        step = metrics["epoch"] * self.steps_per_epoch
        for name in EPOCH_SCALARS:
            self.writer.add_scalar(f"epoch/{name}", metrics[name], step)
        self.writer.flush()


@contextlib.contextmanager
def run_scalars(folder: str, run_id: str, settings: dict, every: int, steps_per_epoch: int, world_size: int,
                steps_done: int) -> Iterator[RunScalars]:
    """A RunScalars writing into folder/<run_id>/, closed when the block ends."""
    scalars = RunScalars(files.inside(Path(folder), run_id, "TensorBoard run folder"), settings, every,
                         steps_per_epoch, world_size, steps_done)
    try:
        yield scalars
    finally:
        scalars.writer.close()
