"""--profile: one two-rank gloo run's traces and breakdown, the figure and summary drawn from it, and the breakdown's
arithmetic on hand-made traces of a CPU and a GPU step."""

import json
import os
import subprocess
import sys

import pytest

import run_hpc
from hpml import results
from hpml.config import TrainConfig
from hpml.study import matrix, plots
from hpml.training import trace_breakdown
from hpml.training.dist import free_port
from tests.helpers import REPO, record, refusal

PROFILE_STEPS = 2


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory):
    """Two gloo ranks, one epoch of 2 steps of 10 images each, then the profiled window."""
    out = tmp_path_factory.mktemp("profiled")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "run_distributed.py", "--model", "shufflenetv2", "--dataset", "synthetic",
               "--subset", "40", "--batch-size", "10", "--epochs", "1", "--workers", "0", "--device", "cpu",
               "--quiet", "--output-dir", str(out), "--profile", "--profile-steps", str(PROFILE_STEPS)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "ERROR" not in done.stderr and "profiler_st" not in done.stderr  # no profiler noise on a CPU run
    (run,), skipped = results.load_all(out)
    assert skipped == []  # the traces beside the record are not taken for records
    return out, run


def test_each_rank_writes_a_chrome_trace_that_shows_the_all_reduce(profiled_run):
    out, run = profiled_run
    names = [f"{run['run_id']}.rank{rank}.trace.json" for rank in (0, 1)]
    assert run["profile"]["traces"] == names
    for name in names:
        events = json.loads((out / name).read_text())["traceEvents"]
        steps = {event["name"] for event in events if event["name"].startswith("ProfilerStep#")}
        assert len(steps) == PROFILE_STEPS, name
        assert any(event["name"] == "gloo:all_reduce" for event in events), name


def test_the_breakdown_adds_up_and_the_profiled_steps_stay_out_of_the_timed_epoch(profiled_run):
    _, run = profiled_run
    profile = results.validate_record(run)["profile"]
    parts = sum(profile[part] for part in ("compute_ms", "optimizer_ms", "data_ms", "exposed_communication_ms"))
    assert parts == pytest.approx(profile["step_ms"])
    assert 0 < profile["exposed_communication_ms"] <= profile["communication_ms"]
    assert profile["exposed_communication_share"] == pytest.approx(profile["exposed_communication_ms"]
                                                                   / profile["step_ms"])
    assert profile["steps"] == PROFILE_STEPS
    assert run["epochs"][0]["train_images"] == 40  # the window's images are counted nowhere
    # What communication costs a step: synced against no_sync() steps, timed after the window.
    assert profile["synced_step_ms"] > 0 and profile["no_sync_step_ms"] > 0
    assert profile["communication_cost_share"] == pytest.approx(
        max(0.0, profile["synced_step_ms"] - profile["no_sync_step_ms"]) / profile["synced_step_ms"])


def test_the_breakdown_figure_and_the_summary_show_a_profiled_run_and_leave_others_be(profiled_run, tmp_path):
    out, run = profiled_run
    plain = tmp_path / "plain"
    results.write_results(record("plain"), plain)
    plots.make_all(plain, tmp_path / "plain_img", log=lambda _: None)
    assert not (tmp_path / "plain_img" / "Breakdown.png").exists()
    assert "exposed comm." in (tmp_path / "plain_img" / "summary.md").read_text()
    plots.make_all(out, tmp_path / "img", log=lambda _: None)
    assert (tmp_path / "img" / "Breakdown.png").stat().st_size > 0
    (row,) = [line for line in (tmp_path / "img" / "summary.md").read_text().splitlines()
              if line.startswith("| shufflenetv2 |")]
    share = run["profile"]["exposed_communication_share"]
    assert f"| {share * 100:.0f}% (model " in row


def test_a_profiled_study_passes_the_flag_and_runs_again_a_cell_without_a_breakdown():
    cfg = TrainConfig(models=["shufflenetv2"], profile=True, profile_steps=3).validate()
    cell = matrix.Cell("shufflenetv2", 2, 0)
    command = matrix.local_command(cell, cfg)
    assert command[command.index("--profile") + 1] == "true"
    assert command[command.index("--profile-steps") + 1] == "3"
    done = record("done", mode="distributed", world_size=2, model="shufflenetv2", config=cfg.as_dict())
    assert matrix.cells_to_run([cell], [done], cfg) == [cell]
    assert matrix.cells_to_run([cell], [{**done, "profile": {}}], cfg) == []


def test_a_bad_profile_steps_is_refused_naming_it(capsys):
    assert "--profile-steps must be a positive number of steps, got 0" in refusal(
        run_hpc.main, ["--profile", "--profile-steps", "0"], capsys)


def event(name, start, end, thread=1, cat="cpu_op"):
    return {"ph": "X", "name": name, "ts": start, "dur": end - start, "tid": thread, "cat": cat}


def test_on_a_cpu_exposed_is_communication_the_training_thread_waits_for_or_does_itself():
    trace = {"traceEvents": [
        event("ProfilerStep#1", 0, 100_000, cat="user_annotation"),
        event(trace_breakdown.DATA_SPAN, 0, 2_000, cat="user_annotation"),
        event("autograd::engine::evaluate_function: AccumulateGrad", 10_000, 60_000),
        event("c10d::allreduce_", 50_000, 60_000),  # starting the all-reduce, inside an operator
        event("gloo:all_reduce", 30_000, 75_000, thread=2, cat="user_annotation"),
        event("torch.distributed.ddp.reducer::copy_bucket_to_grad", 75_000, 80_000),
        event("Optimizer.step#SGD.step", 80_000, 95_000, cat="user_annotation"),
        event("aten::add_", 80_000, 95_000)]}
    breakdown = trace_breakdown.step_breakdown(trace, gpu=False)
    # communication 30-80 ms; covered by the operator 30-50 ms; exposed 50-80 ms (the start, the wait, the copy)
    assert breakdown == pytest.approx({"step_ms": 100, "communication_ms": 50, "exposed_communication_ms": 30,
                                       "optimizer_ms": 15, "data_ms": 2, "compute_ms": 53})


def test_on_a_gpu_exposed_is_nccl_kernel_time_no_other_kernel_covers():
    trace = {"traceEvents": [
        event("ProfilerStep#1", 0, 100_000, cat="user_annotation"),
        event("ProfilerStep#2", 100_000, 200_000, cat="user_annotation"),
        *[event(name, start + offset, end + offset, thread=7, cat=cat) for offset in (0, 100_000)
          for name, start, end, cat in (("void conv_kernel", 0, 50_000, "kernel"),
                                        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 40_000, 70_000, "kernel"),
                                        ("Optimizer.step#SGD.step", 75_000, 90_000, "gpu_user_annotation"),
                                        ("void multi_tensor_apply_kernel", 75_000, 90_000, "kernel"))],
        event("Optimizer.step#SGD.step", 70_000, 72_000, cat="user_annotation")]}  # the CPU side: not counted
    breakdown = trace_breakdown.step_breakdown(trace, gpu=True)
    assert breakdown == pytest.approx({"step_ms": 100, "communication_ms": 30, "exposed_communication_ms": 20,
                                       "optimizer_ms": 15, "data_ms": 0, "compute_ms": 65})


def test_a_trace_without_a_profiled_step_is_refused():
    with pytest.raises(ValueError, match="no profiled step"):
        trace_breakdown.step_breakdown({"traceEvents": [event("aten::add", 0, 1)]}, gpu=False)
