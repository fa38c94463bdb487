"""--tensorboard: the event files a tiny run writes, read back with TensorBoard's own reader, against its results."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import run_hpc
from hpml import cli, data
from hpml.config import TrainConfig
from hpml.errors import RunStopped, UsageError
from hpml.training import dist, loop, tensorboard_log
from tests.helpers import refusal

STEPS_PER_EPOCH = 4  # 40 images at batch 10


def config(out: Path, **changes: object) -> TrainConfig:
    return TrainConfig(models=["shufflenetv2"], dataset="synthetic", subset=40, batch_size=10, epochs=2, workers=0,
                       device="cpu", output_dir=str(out), quiet=True, tensorboard=str(out / "tb"), **changes).validate()


def read(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder))
    events.Reload()
    return events


def steps_and_values(events: EventAccumulator, tag: str) -> tuple[list[int], list[float]]:
    scalars = events.Scalars(tag)
    return [scalar.step for scalar in scalars], [scalar.value for scalar in scalars]


def as_written(values: list[float]) -> list[float]:
    """Values as a TensorBoard scalar keeps them: float32."""
    return [float(np.float32(value)) for value in values]


@pytest.fixture(scope="module")
def images() -> data.ImageSet:
    return data.synthetic_cifar10(40, 20)


def test_each_epochs_scalars_equal_the_results_and_steps_come_every_n(images, tmp_path):
    record = loop.fit(config(tmp_path, tensorboard_every=3), "shufflenetv2", dist.single_process("cpu"), images,
                       log=lambda _: None)
    (folder,) = (tmp_path / "tb").iterdir()
    assert folder.name == record["run_id"]
    events = read(folder)
    for name in tensorboard_log.EPOCH_SCALARS:
        steps, values = steps_and_values(events, f"epoch/{name}")
        assert steps == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH], name  # each epoch at its last step
        assert values == as_written([epoch[name] for epoch in record["epochs"]]), name
    for name in ("step/loss", "step/images_per_s"):
        steps, values = steps_and_values(events, name)
        assert steps == [3, 6] and all(math.isfinite(value) and value > 0 for value in values), name
    (settings,) = events.Tensors("settings/text_summary")
    text = settings.tensor_proto.string_val[0].decode()
    assert f'| run_id | `"{record["run_id"]}"` |' in text and "| tensorboard_every | `3` |" in text


def test_a_resumed_run_goes_on_in_its_folder_at_the_step_it_stopped(images, tmp_path):
    world = dist.single_process("cpu")
    stops = iter([False, True])  # the loop reads the flag once per step in a world of one: a stop at step 2
    with pytest.raises(RunStopped, match="at step 2 of epoch 1"):
        loop.fit(config(tmp_path, tensorboard_every=1), "shufflenetv2", world, images, lambda _: None,
                  lambda: next(stops))
    record = loop.fit(config(tmp_path, tensorboard_every=1, resume=True), "shufflenetv2", world, images,
                       lambda _: None)
    (folder,) = (tmp_path / "tb").iterdir()
    events = read(folder)
    assert steps_and_values(events, "step/loss")[0] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert steps_and_values(events, "epoch/test_acc")[1] == as_written([e["test_acc"] for e in record["epochs"]])
    assert [settings.step for settings in events.Tensors("settings/text_summary")] == [0, 2]


def test_a_resumed_writer_hides_what_the_interrupted_attempt_wrote_after_its_checkpoint(tmp_path):
    def write(steps_done: int, last_step: int, loss: float) -> None:
        with tensorboard_log.run_scalars(str(tmp_path), "run", {}, 1, 10, 1, steps_done) as scalars:
            scalars.start_epoch(1, None)
            for step in range(steps_done + 1, last_step + 1):
                scalars.after_step(step, torch.tensor(loss * step, dtype=torch.float64), step)

    write(0, 6, loss=2.0)  # steps 1-6; the checkpoint it leaves is at step 4
    write(4, 8, loss=1.0)
    steps, values = steps_and_values(read(tmp_path / "run"), "step/loss")
    assert steps == list(range(1, 9)) and values == [2.0] * 4 + [1.0] * 4


def test_tensorboard_without_its_package_is_one_line_saying_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` fails, as where it is missing
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    argv = ["--model", "shufflenet", "--dataset", "synthetic", "--subset", "40", "--epochs", "1", "--device", "cpu",
            "--output-dir", str(tmp_path / "out"), "--tensorboard", str(tmp_path / "tb")]
    err = refusal(run_hpc.main, argv, capsys)
    assert "--tensorboard needs the tensorboard package" in err and err.endswith("install it with: pip install "
                                                                                "tensorboard")
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "tb").exists()  # refused before


def test_tensorboard_alone_writes_into_runs_or_a_sagemaker_jobs_tensorboard_folder(tmp_path, monkeypatch):
    def parsed(argv: list[str]) -> TrainConfig:
        parser = cli.ArgumentParser()
        cli.add_training_args(parser)
        return cli.config_from_args(parser.parse_args(argv))

    assert parsed([]).tensorboard is None
    assert parsed(["--tensorboard"]).tensorboard == "runs"
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("SM_TRAINING_ENV", "{}")
    assert parsed(["--tensorboard"]).tensorboard == str(tmp_path / "output" / "tensorboard")
    assert parsed(["--tensorboard", "tb", "--tensorboard-every", "5"]).tensorboard_every == 5
    with pytest.raises(UsageError, match="--tensorboard-every must be a positive number of steps, got 0"):
        parsed(["--tensorboard-every", "0"])
