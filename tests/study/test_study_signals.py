"""run_study.py under SIGTERM and Ctrl-C: the running cell stops at a checkpoint, nothing the study started outlives
it, and the study ends with one line and exit code 143 or 130."""

import contextlib
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from hpml.study import matrix
from tests.helpers import REPO, exit_code_of, run_script, script_main
from tests.study.test_study import FLAGS


def ended(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # an orphan's end, where PID 1 reaps none
    except psutil.NoSuchProcess:
        return True


def wait_for(path: Path, process: subprocess.Popen) -> None:
    """Wait until the study's cell has written `path` (its first checkpoint: it is training on every rank)."""
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the study ended before its cell saved a checkpoint: {process.returncode}, "
                        f"{process.stderr.read()}")
        time.sleep(0.05)


@pytest.mark.parametrize("world_size", [1, 2])
def test_sigterm_stops_the_running_cell_at_a_checkpoint_and_leaves_no_process(world_size, tmp_path):
    out, mode = tmp_path / "out", "single" if world_size == 1 else "distributed"
    checkpoint = out / "checkpoints" / f"shufflenetv2_{mode}_w{world_size}" / "last.pt"
    argv = ["--models", "shufflenetv2", "--world-sizes", str(world_size), "--dataset", "synthetic", "--subset", "64",
            "--batch-size", "16", "--epochs", "3", "--quiet", "--output-dir", str(out)]
    running = subprocess.Popen([sys.executable, str(REPO / "run_study.py"), *argv], cwd=REPO, text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tree: list[psutil.Process] = []
    try:
        wait_for(checkpoint, running)
        tree = psutil.Process(running.pid).children(recursive=True)  # python run_hpc.py, or torchrun and its ranks
        assert len(tree) >= world_size
        running.send_signal(signal.SIGTERM)
        _, err = running.communicate(timeout=120)
        left = [process for process in tree if not ended(process)]
    finally:
        for process in [*tree, running]:
            with contextlib.suppress(psutil.Error, OSError):
                process.kill()
    assert running.returncode == 143, err
    assert err.strip().splitlines()[-1] == (
        f"run_study.py: stopped by SIGTERM during shufflenetv2 x{world_size} ({mode}) #1; its checkpoint: "
        f"{checkpoint}; rerun the same command with --resume to continue")
    assert 'run_study.py", line' not in err and left == [] and checkpoint.exists()
    again = run_script("run_study.py", *argv, "--resume", "--dry-run")  # the rerun the line asks for
    assert again.returncode == 0 and ", 1 to run" in again.stdout
    command = shlex.split(again.stdout.splitlines()[-1])
    assert command[command.index("--resume") + 1] == "true" and command[command.index("--output-dir") + 1] == str(out)


CELL = """
import os, signal, subprocess, sys, time
for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, signal.SIG_IGN)  # a cell that does not stop
rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
open(sys.argv[1], "w").write(str(rank.pid))
for signum in sys.argv[2:]:
    os.kill(os.getppid(), int(signum))
    time.sleep(0.5)
time.sleep(120)
"""


@pytest.mark.parametrize("signals, code, killed", [
    ([signal.SIGTERM], 143, "killed after 1 s"),
    ([signal.SIGINT, signal.SIGINT], 130, "killed after a second Ctrl-C"),
])
def test_a_cell_that_does_not_stop_is_killed_with_what_it_started(signals, code, killed, tmp_path, monkeypatch,
                                                                   capsys):
    pid_file = tmp_path / "rank.pid"
    monkeypatch.setattr(matrix, "local_command", lambda cell, cfg: [sys.executable, "-c", CELL, str(pid_file),
                                                                   *map(str, signals)])
    monkeypatch.setattr(matrix, "KILL_AFTER_S", 1.0 if signals == [signal.SIGTERM] else 60.0)
    start = time.monotonic()
    argv = ["--models", "resnet18", "--world-sizes", "1", *FLAGS, "--output-dir", str(tmp_path / "out")]
    assert exit_code_of(script_main("run_study.py"), argv) == code
    assert time.monotonic() - start < 20
    name = signal.Signals(signals[0]).name
    assert capsys.readouterr().err.strip().endswith(
        f": stopped by {name} during resnet18 x1 (single) #1, {killed}; it had saved no checkpoint yet; rerun the "
        "same command with --resume to continue")
    rank = int(pid_file.read_text())
    assert not psutil.pid_exists(rank) or ended(psutil.Process(rank))
