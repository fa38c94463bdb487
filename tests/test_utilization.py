"""utilization.py as a user runs it: one snapshot, a timed CSV log, the JSON summary, Ctrl-C, bad flags, and the
GPU table through a stand-in pynvml."""

import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from hpml import monitor
from hpml.scripts import utilization
from tests.helpers import FAKE_PYNVML, REPO, exit_code_of, run_script

SUMMARY_FIELDS = ["interval_s", "samples", "samples_csv", "nvml", "nvml_error", "gpus", "mean_gpu_util_pct",
                  "max_gpu_util_pct", "peak_gpu_mem_mib", "mean_cpu_pct", "peak_ram_mib"]


@pytest.fixture
def without_nvml(tmp_path):
    """Subprocess environment where `import pynvml` fails, whatever this machine has."""
    (tmp_path / "pynvml.py").write_text("raise ImportError('no NVML here')\n")
    return {"PYTHONPATH": str(tmp_path)}


@pytest.fixture
def with_fake_gpus(tmp_path):
    """Subprocess environment whose pynvml is the two-GPU stand-in."""
    folder = tmp_path / "fake"
    folder.mkdir()
    shutil.copy(FAKE_PYNVML, folder / "pynvml.py")
    return {"PYTHONPATH": str(folder)}


def test_a_gpu_name_beyond_ascii_is_shown_and_written_as_utf8_under_a_c_locale(tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "pynvml.py").write_text(FAKE_PYNVML.read_text().replace('"Fake GPU 80GB"', '"Fake GPU 80GB \u00e9t\u00e9"'),
                                    encoding="utf-8")
    csv_path = tmp_path / "u.csv"
    ascii_only = {"PYTHONPATH": str(fake), "LC_ALL": "C", "PYTHONUTF8": "0"}  # a locale that encodes ASCII only
    done = run_script("utilization.py", "--once", "--csv", str(csv_path), env=ascii_only)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "Fake GPU 80GB \\xe9t\\xe9" in done.stdout  # what the terminal cannot show, escaped
    assert ",Fake GPU 80GB \u00e9t\u00e9," in csv_path.read_text(encoding="utf-8")
    assert monitor.read_samples_csv(csv_path)[0]["gpu_name"] == "Fake GPU 80GB \u00e9t\u00e9"


def test_once_without_nvml_says_so_in_one_line_and_shows_cpu_and_ram(without_nvml):
    done = run_script("utilization.py", "--once", env=without_nvml)
    assert done.returncode == 0 and "Traceback" not in done.stderr
    (notice,) = done.stderr.strip().splitlines()
    assert "no NVIDIA GPU readable" in notice and "showing CPU and RAM only" in notice
    header, line = done.stdout.strip().splitlines()
    assert header.split() == ["t", "s", "CPU", "%", "RAM", "MiB"]
    assert 0 <= float(line.split()[1]) <= 100


def test_duration_and_interval_write_timed_csv_rows(tmp_path):
    csv_path = tmp_path / "u.csv"
    done = run_script("utilization.py", "--duration", "2", "--interval", "0.5", "--csv", str(csv_path))
    assert done.returncode == 0, done.stderr
    rows = monitor.read_samples_csv(csv_path)
    assert csv_path.read_text().startswith(",".join(monitor.CSV_FIELDS) + "\n")
    assert 3 <= len(rows) <= 4 and rows[-1]["elapsed_s"] >= 1.999
    assert all(row["cpu_pct"] is not None and row["ram_total_mib"] > 0 for row in rows)
    assert len(done.stdout.strip().splitlines()) == len(rows) + 1  # header and one line per sample


def test_json_summary_on_stdout_and_csv_appends(tmp_path, capsys):
    csv_path = tmp_path / "u.csv"
    for _ in range(2):
        argv = ["--duration", "0.3", "--interval", "0.1", "--csv", str(csv_path), "--json"]
        assert exit_code_of(utilization.main, argv) == 0
        out = capsys.readouterr()
        summary = json.loads(out.out)
        assert "CPU %" in out.err  # the live table moved to stderr
    assert list(summary) == SUMMARY_FIELDS
    assert summary["samples"] in (2, 3) and summary["interval_s"] == 0.1 and summary["samples_csv"] == str(csv_path)
    assert summary["mean_cpu_pct"] is not None and summary["peak_ram_mib"] > 0
    lines = csv_path.read_text().splitlines()
    assert lines.count(",".join(monitor.CSV_FIELDS)) == 1 and len(monitor.read_samples_csv(csv_path)) >= 6


def test_gpu_table_and_summary_through_nvml(with_fake_gpus, tmp_path):
    csv_path = tmp_path / "gpus.csv"
    done = run_script("utilization.py", "--once", "--json", "--csv", str(csv_path), env=with_fake_gpus)
    assert done.returncode == 0, done.stderr
    table = done.stderr.strip().splitlines()
    assert "util %" in table[0] and "Fake GPU 80GB" in table[1] and "Fake GPU 16GB" in table[2]
    assert "10240 / 81920" in table[1] and "300.5" in table[1]
    summary = json.loads(done.stdout)
    assert summary["nvml"] is True and summary["nvml_error"] is None and summary["samples"] == 1
    assert [(g["gpu"], g["name"], g["mem_total_mib"]) for g in summary["gpus"]] == [
        (0, "Fake GPU 80GB", 81920.0), (1, "Fake GPU 16GB", 16384.0)]
    assert summary["peak_gpu_mem_mib"] == 10240.0
    assert [row["gpu"] for row in monitor.read_samples_csv(csv_path)] == [0, 1]


def test_ctrl_c_ends_the_live_view_cleanly(without_nvml):
    # A shell without job control starts background jobs (a CI run started with `&`, say) with SIGINT ignored,
    # and children inherit that: give the view the default disposition, as a terminal's Ctrl-C would find it.
    process = subprocess.Popen([sys.executable, str(REPO / "utilization.py"), "--interval", "0.2", "--json"],
                               cwd=REPO, env={**os.environ, **without_nvml, "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while "CPU %" not in process.stderr.readline():  # the table is on stderr with --json
            assert process.poll() is None
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0 and "Traceback" not in err
    assert json.loads(out)["samples"] >= 1


def test_redraws_in_place_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    table = utilization.Table(screen, 1.0)
    row = dict.fromkeys(monitor.CSV_FIELDS)
    row.update(timestamp="2024-01-01T00:00:00.000+00:00", elapsed_s=1.0, host="node1", cpu_pct=12.5,
               ram_used_mib=100.0, ram_total_mib=200.0)
    table.show([row])
    table.show([row])
    assert screen.getvalue().count("\x1b[H\x1b[J") == 2 and "every 1 s, Ctrl-C to stop" in screen.getvalue()
    assert "12.5" in screen.getvalue() and "100 / 200" in screen.getvalue()


BAD_FLAGS = [
    (["--interval", "0"], "--interval must be a positive number of seconds, got 0.0"),
    (["--interval", "-1"], "--interval must be a positive number of seconds, got -1.0"),
    (["--interval", "nan"], "--interval must be a positive number of seconds, got nan"),
    (["--interval", "fast"], "invalid float value: 'fast'"),
    (["--duration", "-2"], "--duration must be a positive number of seconds, got -2.0"),
    (["--duration", "0"], "--duration must be a positive number of seconds, got 0.0"),
    (["--once", "--duration", "3"], "not allowed with argument --once"),
    (["--interval", "2", "--duration", "1"], "--duration 1.0 is shorter than --interval 2.0: no sample would be taken"),
    (["--interval", "1e300"], "--interval must be between 0.01 and 3600 seconds, got 1e+300"),
    (["--interval", "1e-6"], "--interval must be between 0.01 and 3600 seconds, got 1e-06"),
    (["--every", "2"], "unrecognized arguments: --every 2"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_is_one_clear_line(argv, message, capsys):
    assert exit_code_of(utilization.main, argv) == 2
    out, err = capsys.readouterr()
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err and out == ""


def test_unwritable_csv_paths_fail_before_sampling(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("notes\n")
    for path, message in ((blocker / "u.csv", "a-file is a file, not a folder"), (tmp_path, "is a folder"),
                          (blocker, "header differs")):
        assert exit_code_of(utilization.main, ["--once", "--csv", str(path)]) == 2
        out, err = capsys.readouterr()
        assert message in err and len(err.strip().splitlines()) == 1 and out == ""  # no table: nothing sampled
    assert blocker.read_text() == "notes\n"


def test_a_file_size_limit_on_the_csv_is_one_line(tmp_path):
    def limited() -> None:  # the header fits in part: the write fails half-way, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    csv_path = tmp_path / "u.csv"
    done = subprocess.run([sys.executable, str(REPO / "utilization.py"), "--once", "--csv", str(csv_path)], cwd=REPO,
                          capture_output=True, text=True, preexec_fn=limited, timeout=60)
    line = done.stderr.strip().splitlines()[-1]  # after the line saying no GPU is readable, where none is
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert str(csv_path) in line and line.endswith(": File too large"), done.stderr


def test_every_flag_has_help():
    done = run_script("utilization.py", "--help")
    assert done.returncode == 0
    for flag in ("--once", "--duration", "--interval", "--csv", "--json"):
        assert flag in done.stdout
    assert "%(default)" not in done.stdout and "default: 1.0" in done.stdout


@pytest.mark.parametrize("content", [b"\x00\xff\xfe binary", b"\n\nnotes\n", b"   \nnotes\n", b"timestamp,elapsed_s\n"],
                         ids=["binary", "blank first line", "spaces first line", "another header"])
def test_csv_onto_a_file_that_is_not_samples_is_refused_and_left_as_it_was(content, tmp_path, capsys):
    other = tmp_path / "other.csv"
    other.write_bytes(content)
    assert exit_code_of(utilization.main, ["--once", "--csv", str(other)]) == 2
    out, err = capsys.readouterr()
    assert "holds something other than utilization samples" in err and len(err.strip().splitlines()) == 1
    assert out == "" and other.read_bytes() == content


def test_a_sampling_thread_that_dies_ends_the_program_in_one_line(monkeypatch, capsys):
    def sensor_gone():
        raise RuntimeError("sensor gone")

    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(monitor.psutil, "virtual_memory", sensor_gone)
    ended = {}
    argv = ["--duration", "60", "--interval", "0.05"]
    runner = threading.Thread(target=lambda: ended.update(code=exit_code_of(utilization.main, argv)), daemon=True)
    runner.start()
    runner.join(timeout=20)
    assert ended.get("code") == 1, "still waiting on a sampling thread that is gone"
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(": sampling stopped: RuntimeError: sensor gone") and "Traceback" not in err


def test_a_reader_that_goes_away_ends_the_live_view_quietly():
    process = subprocess.Popen([sys.executable, str(REPO / "utilization.py"), "--duration", "30", "--interval", "0.1"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.readline()
    process.stdout.close()  # as `utilization.py | head -1` does
    err = process.stderr.read()
    assert process.wait(timeout=30) == 1
    assert "Traceback" not in err and "Exception ignored" not in err and len(err.strip().splitlines()) <= 1, err
