"""plot_hpml.py on results made by really running run_hpc.py and run_distributed.py (torchrun, gloo) briefly."""

import errno
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import matplotlib.figure
import pytest

import plot_hpml
import run_hpc
from hpml import results
from hpml.study import plots, summary
from hpml.training.dist import free_port
from tests.helpers import REPO, exit_code_of, gpu_record, record, results_in, run_script

TINY_RUN = ["--dataset", "synthetic", "--subset", "20", "--batch-size", "10", "--epochs", "2", "--workers", "0",
            "--quiet"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    """shufflenetv2 on one process and on two (torchrun, gloo); the single run has monitor samples."""
    folder = tmp_path_factory.mktemp("results")
    assert exit_code_of(run_hpc.main, ["--model", "shufflenet", *TINY_RUN, "--utilization", "--sample-interval",
                                       "0.25", "--output-dir", str(folder)]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "run_distributed.py", "--model", "shufflenet", *TINY_RUN, "--output-dir", str(folder)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr
    (single,) = folder.glob("shufflenetv2_single_*.json")
    assert json.loads(single.read_text())["utilization"]["samples"] >= 1
    return folder


@pytest.fixture(scope="module")
def plotted(results_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("img")
    done = run_script("plot_hpml.py", "--results-dir", str(results_dir), "--output-dir", str(out))
    return out, done


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


def table_rows(markdown: str) -> list[dict]:
    """The rows of every markdown table in summary.md, as dicts keyed by the header cells."""
    rows, header = [], None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if header is None:
            header = cells
        elif not set(line) <= set("|-"):
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


def test_writes_every_figure_and_the_summary(plotted):
    out, done = plotted
    assert done.returncode == 0, done.stderr
    for name in ("Time.png", "Accuracy.png", "Curves.png", "Speedup.png", "Utilization.png"):
        width, height = png_size(out / name)
        assert 900 <= width <= 4000 and 600 <= height <= 4000, (name, width, height)
        assert (out / name).stat().st_size > 30_000, name  # a blank canvas of that size compresses far below
        assert f"wrote {out / name}" in done.stdout
    assert (out / "summary.md").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_summary_has_a_row_per_group_and_the_measured_speedup(plotted, results_dir):
    out, _ = plotted
    rows = {(row["model"], row["mode"], row["world size"]): row for row in table_rows((out / "summary.md").read_text())}
    assert set(rows) == {("shufflenetv2", "single", "1"), ("shufflenetv2", "distributed", "2")}
    runs = {(r["model"], r["mode"]): r for r in results_in(results_dir)}
    single_epochs, distributed_epochs = (runs["shufflenetv2", mode]["epochs"] for mode in ("single", "distributed"))
    speedup = single_epochs[-1]["epoch_time_s"] / distributed_epochs[-1]["epoch_time_s"]  # 2 epochs: the second
    total_speedup = runs["shufflenetv2", "single"]["total_train_time_s"] / runs["shufflenetv2", "distributed"][
        "total_train_time_s"]
    distributed = rows["shufflenetv2", "distributed", "2"]
    assert distributed["speedup"] == f"{speedup:.2f}×"
    assert distributed["efficiency"] == f"{speedup / 2:.0%}"
    assert distributed["speedup incl. warm-up"] == f"{total_speedup:.2f}×"
    assert distributed["backend"] == "gloo" and distributed["runs"] == "1"
    assert distributed["total time (s)"] == f"{runs['shufflenetv2', 'distributed']['total_train_time_s']:.1f}"
    assert distributed["final acc (%)"] == f"{runs['shufflenetv2', 'distributed']['final_test_acc'] * 100:.1f}"
    assert rows["shufflenetv2", "single", "1"]["speedup"] == "baseline"


def test_figures_and_summary_name_the_hardware_and_data(results_dir, plotted):
    groups = summary.group_runs(results_in(results_dir), warn=pytest.fail)
    tag = summary.title_tag(groups)
    assert "CPU only" in tag and "synthetic data (not CIFAR-10)" in tag
    assert "20 training images" in tag and "2 epochs" in tag
    footer = "\n".join(summary.setup_lines(groups))
    cpu = results_in(results_dir)[0]["environment"]["cpu"]
    assert f"CPU {cpu}" in footer and "no GPU" in footer and "Batch: 10 images per process" in footer
    markdown = (plotted[0] / "summary.md").read_text()
    assert f"CPU {cpu}" in markdown and "synthetic CIFAR-shaped data (not CIFAR-10)" in markdown


def test_malformed_and_foreign_files_are_warned_about_and_skipped(results_dir, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(results_dir, folder)
    (folder / "broken.json").write_text('{"run_id": "cut off')
    (folder / "foreign.json").write_text(json.dumps({"name": "a package.json", "version": "1.0"}))
    real = results_in(results_dir)[0]
    bad = {"nan-time": ("total_train_time_s", float("nan")), "no-config": ("config", None),
           "sagemaker-list": ("sagemaker", [1]), "text-accuracy": ("final_test_acc", "0.9"),
           "two-ranks": ("world_size", "two")}
    for name, (field, value) in bad.items():
        (folder / f"{name}.json").write_text(json.dumps({**real, "run_id": name, field: value}))
    done = run_script("plot_hpml.py", "--results-dir", str(folder), "--output-dir", str(tmp_path / "img"))
    assert done.returncode == 0, done.stderr
    warnings = done.stderr.strip().splitlines()
    assert len(warnings) == 2 + len(bad), done.stderr
    assert "broken.json" in warnings[0] and "foreign.json: missing fields" in warnings[1]
    for line, (name, (field, _)) in zip(warnings[2:], bad.items(), strict=True):
        assert f"{name}.json: {field} must be " in line, line
    assert all(line.startswith("plot_hpml.py: warning: skipped ") for line in warnings)
    assert len(table_rows((tmp_path / "img" / "summary.md").read_text())) == 2


@pytest.mark.parametrize("mode", ["single", "distributed"])
def test_a_model_with_one_mode_has_no_speedup(mode, results_dir, tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    for path in results_dir.glob(f"shufflenetv2_{mode}_*"):
        shutil.copy(path, folder)
    plots.make_all(folder, tmp_path / "img")
    (row,) = table_rows((tmp_path / "img" / "summary.md").read_text())
    assert row["mode"] == mode and row["efficiency"] == "—"
    assert row["speedup"] == ("—" if mode == "single" else "no single-process run of shufflenetv2")
    made = sorted(p.name for p in (tmp_path / "img").iterdir())
    if mode == "distributed":  # only the single run has monitor samples
        assert made == ["Accuracy.png", "Curves.png", "Speedup.png", "Time.png", "summary.md"]
        assert "Utilization.png not made: no run has monitor samples" in capsys.readouterr().out
    else:
        assert "Utilization.png" in made


@pytest.mark.parametrize("make_input, flags, message", [
    (lambda d: d.mkdir(), [], "no valid results JSON files found (0 skipped)"),
    (lambda d: (d.mkdir(), (d / "a.json").write_text("[1, 2]")), [], "no valid results JSON files found (1 skipped)"),
    (lambda d: None, [], "no such folder"),
    (lambda d: d.mkdir(), ["--dpi", "5"], "--dpi must be between 50 and 600, got 5"),
    (lambda d: d.mkdir(), ["--dpi", "many"], "argument --dpi: invalid int value: 'many'"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(make_input, flags, message, tmp_path, capsys):
    make_input(tmp_path / "results")
    code = exit_code_of(plot_hpml.main, ["--results-dir", str(tmp_path / "results"), "--output-dir",
                                         str(tmp_path / "img"), *flags])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "warning" not in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "img" / "Time.png").exists()


def test_an_output_folder_that_cannot_be_written_is_one_line(results_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = exit_code_of(plot_hpml.main, ["--results-dir", str(results_dir), "--output-dir", str(blocker / "img")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"output folder .*file/img is not writable", err)


def two_runs(folder: Path) -> Path:
    folder.mkdir()
    for run in (record("s"), record("d", world_size=2, mode="distributed", total_train_time_s=4.25)):
        (folder / f"{run['run_id']}.json").write_text(json.dumps(run))
    return folder


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.ENAMETOOLONG, errno.EACCES],
                         ids=errno.errorcode.get)
def test_a_failed_write_is_one_line_and_leaves_no_figure_half_written(code, tmp_path, capsys, monkeypatch):
    runs, img = two_runs(tmp_path / "runs"), tmp_path / "img"
    img.mkdir()
    (img / "Accuracy.png").write_bytes(b"an earlier figure")
    savefig = matplotlib.figure.Figure.savefig

    def fail_on_the_second(figure, path, **kwargs):
        if "Accuracy" not in Path(path).name:
            return savefig(figure, path, **kwargs)
        Path(path).write_bytes(PNG_SIGNATURE)  # what fitted
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fail_on_the_second)
    assert exit_code_of(plot_hpml.main, ["--results-dir", str(runs), "--output-dir", str(img)]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.endswith(f": error: cannot write {img / 'Accuracy.png'}: "
                                                       f"{os.strerror(code)}\n"), err
    assert sorted(path.name for path in img.iterdir()) == ["Accuracy.png", "Time.png"]
    assert (img / "Accuracy.png").read_bytes() == b"an earlier figure" and png_size(img / "Time.png")


def test_a_file_size_limit_is_one_line_and_the_figure_before_stays(tmp_path):
    runs, img = two_runs(tmp_path / "runs"), tmp_path / "img"
    img.mkdir()
    (img / "Time.png").write_bytes(b"an earlier figure")
    limit = (16_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1])  # every figure is larger, summary.md smaller
    done = subprocess.run([sys.executable, "plot_hpml.py", "--results-dir", str(runs), "--output-dir", str(img)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, limit))
    assert done.returncode == 1
    assert done.stderr == f"plot_hpml.py: error: cannot write {img / 'Time.png'}: File too large\n"
    assert [path.name for path in img.iterdir()] == ["Time.png"]
    assert (img / "Time.png").read_bytes() == b"an earlier figure"


@pytest.mark.parametrize("name, locale", [
    ("résultats-μ", {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}),  # ASCII file names and files, ASCII terminal
    (os.fsdecode(b"runs-\xe9"), {"LC_ALL": "C.UTF-8"}),  # a byte UTF-8 cannot decode
], ids=["non-ASCII folder, LANG=C", "undecodable folder name"])
def test_any_folder_name_in_any_locale_is_read_and_named(name, locale, tmp_path):
    runs = tmp_path / name
    runs.mkdir()
    for run in (record("s", environment={"cpu": "Ryzen™ 9"}),
                record("d", world_size=2, mode="distributed", environment={"cpu": "Ryzen™ 9"})):
        (runs / f"{run['run_id']}.json").write_text(json.dumps(run, ensure_ascii=False), encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONIOENCODING"}
    done = subprocess.run([sys.executable, "plot_hpml.py", "--results-dir", str(runs), "--output-dir",
                           str(runs / "img"), "--dpi", "50"], cwd=REPO, env={**env, **locale}, capture_output=True,
                          timeout=300)
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
    shown = os.fsencode(runs).decode("utf-8", "backslashreplace")
    assert f"wrote {shown}/img/summary.md".encode("ascii", "backslashreplace") in done.stdout
    markdown = (runs / "img" / "summary.md").read_text(encoding="utf-8")
    assert f"2 runs from `{shown}`" in markdown and "CPU Ryzen™ 9" in markdown


def test_sagemaker_runs_are_compared_with_the_sagemaker_baseline(results_dir):
    local = results_in(results_dir)
    sagemaker = [{**run, "run_id": f"{run['run_id']}-sm", "total_train_time_s": run["total_train_time_s"] * 3,
                  "sagemaker": {"job_name": f"hpml-{run['mode']}", "instance_type": "ml.p3.2xlarge"}}
                 for run in local]
    groups = summary.group_runs(local + sagemaker, warn=pytest.fail)
    assert len(groups) == 4 and len(summary.by_setup(groups)) == 2
    for group in groups:
        assert len(group.runs) == 1
        assert group.baseline.platform == group.platform and group.baseline.mode == "single"
    distributed = {group.platform: group for group in groups if group.mode == "distributed"}
    assert distributed["SageMaker"].speedup == pytest.approx(distributed["local"].speedup)
    assert summary.title_tag(groups).startswith("SageMaker and local · ")


def test_speedup_figure_adds_the_speedup_in_time_to_target_when_runs_recorded_it():
    def run(run_id, world_size, **more):
        return record(run_id, world_size=world_size, mode="single" if world_size == 1 else "distributed", **more)

    plain = summary.group_runs([run("s", 1), run("d", 2, total_train_time_s=4.25)], warn=pytest.fail)
    targeted = summary.group_runs([run("s", 1, target_acc=0.5, time_to_target_s=6.0),
                                   run("d", 2, total_train_time_s=4.25, target_acc=0.5, time_to_target_s=4.0)],
                                  warn=pytest.fail)
    labels = [{ax.get_ylabel() for ax in plots.speedup_figure(groups).get_axes()} for groups in (plain, targeted)]
    assert labels[0] == {"epoch time, steady state (s)", "steady-state speedup (×)", "scaling efficiency (%)",
                         "speedup in total time,\nwarm-up included (×)", "final test accuracy (%)"}
    assert labels[1] == labels[0] | {"speedup in time to target (×)"}


def test_mixed_gpus_and_settings_draw_a_panel_each_and_no_speedup_across_them():
    runs = [gpu_record("v100", "Tesla V100-SXM2-16GB"), gpu_record("a100x8", "NVIDIA A100-SXM4-40GB", 8),
            gpu_record("h100", "NVIDIA H100", epoch_times=(9.0, 2.0, 2.0)),
            gpu_record("h100x2", "NVIDIA H100", 2, epoch_times=(3.0, 1.0, 1.0)),
            gpu_record("h100x2-fp32", "NVIDIA H100", 2, precision="fp32")]
    groups = summary.group_runs(runs, warn=pytest.fail)
    figure = plots.time_figure(groups)
    panels = [ax for ax in figure.get_axes() if ax.get_ylabel().startswith("total training time")]
    assert len(panels) == 4
    annotations = sorted(text.get_text() for ax in panels for text in ax.texts)
    assert annotations == ["no baseline", "no baseline", "×2.00 steady\n100% eff.\n×2.60 total"]
    assert {ax.get_title() for ax in panels} >= {"GPU (NVIDIA H100) · unknown data · 3 epochs · fp32, device loader, "
                                                 "channels-last, drop last"}


def test_records_at_the_edges_of_what_the_schema_allows_are_drawn(tmp_path):
    """Nulls and absent fields where allowed, and the extremes of every range, next to each other: no reader fails."""
    most, least = 10**15, 1e-6
    nulls = record("nulls", world_size=2, mode="distributed", backend=None, nodes=None, target_acc=None,
                   time_to_target_s=None, environment=None, sagemaker=None, speed=None, data=None, utilization=None,
                   config={"dataset": None, "data_dir": None, "precision": None, "loader": None})
    required = {*results.REQUIRED_FIELDS, "epochs"}
    bare = {key: value for key, value in record("bare", epoch_times=(least,) * 3).items() if key in required}
    extreme = record("extreme", epoch_times=(most,) * 3, world_size=most, nodes=most, batch_size=most,
                     total_train_time_s=most, time_to_best_s=most, target_acc=1, time_to_target_s=most,
                     data={"train_size": most}, sagemaker={"cost_usd": most, "instance_type": "ml.p4d.24xlarge"})
    for run in (nulls, bare, extreme):
        results.write_results(run, tmp_path / "runs")
    written = plots.make_all(tmp_path / "runs", tmp_path / "img", dpi=50)
    assert [path.name for path in written] == [*plots.FIGURES, "summary.md"]
