"""hpml.study.summary: results grouped for comparison and the summary table, without matplotlib or torch."""

import os
from pathlib import Path

import pytest

from hpml.study import summary
from tests.helpers import gpu_record, heavy_packages_imported_by, record


def test_medians_and_ranges_of_repeated_runs():
    spread = summary.Spread.of([3.0, 10.0, 4.0])
    assert (spread.median, spread.low, spread.high) == (4.0, 3.0, 10.0)
    assert spread.text(".1f") == "4.0 (3.0–10.0)" and summary.Spread.of([2.0, 2.0]).text(".1f") == "2.0"


def test_a_distributed_group_is_compared_with_the_single_device_group():
    single = [record("s1", epoch_times=(5.0, 4.0, 4.0)), record("s2", epoch_times=(6.0, 5.0, 5.0))]
    distributed = record("d1", mode="distributed", backend="gloo", world_size=2, epoch_times=(3.0, 2.25, 2.25))
    groups = summary.group_runs([distributed, *single], warn=pytest.fail)
    assert [(group.mode, len(group.runs)) for group in groups] == [("single", 2), ("distributed", 1)]
    assert groups[1].baseline is groups[0] and groups[0].compared
    assert groups[1].speedup == pytest.approx(4.5 / 2.25) and groups[1].efficiency == pytest.approx(1.0)
    assert groups[1].total_speedup == pytest.approx(14.5 / 7.5)
    markdown = summary.summary_markdown(groups, Path("results"))
    assert "| resnet18 | single | — | 1 | cpu | 2 | 4.50 (4.00–5.00) |" in markdown
    assert "| 2.00× | 100% | 7.5 | 1.93× |" in markdown and "| baseline | — | 14.5 (13.0–16.0) | baseline |" in markdown


def test_equal_steady_speed_is_a_speedup_of_one_whatever_the_first_epoch():
    """Warm-up (the first epoch: kernel selection, graph capture) is not speed: the headline is steady-state."""
    slow_start = record("s", epoch_times=(22.0, 7.9, 7.6, 7.7))
    ddp = record("d", mode="distributed", backend="gloo", world_size=2, epoch_times=(8.0, 7.7, 7.8, 7.7))
    single, distributed = summary.group_runs([slow_start, ddp], warn=pytest.fail)
    assert distributed.speedup == pytest.approx(1.0, abs=0.01) and distributed.efficiency == pytest.approx(0.5, 0.01)
    assert distributed.total_speedup == pytest.approx(45.2 / 31.2)
    rows = summary.summary_markdown([single, distributed], Path("r")).splitlines()
    assert "| 1.00× | 50% | 31.2 | 1.45× |" in rows[-1]


def test_medians_not_means_of_an_odd_number_of_skewed_runs():
    singles = [record(f"s{i}", epoch_times=(9.0, t, t)) for i, t in enumerate((4.0, 4.0, 40.0))]
    ddps = [record(f"d{i}", mode="distributed", backend="gloo", world_size=2, epoch_times=(9.0, t, t))
            for i, t in enumerate((2.0, 2.0, 20.0))]
    single, distributed = summary.group_runs([*singles, *ddps], warn=pytest.fail)
    assert single.epoch_time == summary.Spread(4.0, 4.0, 40.0) and distributed.speedup == pytest.approx(2.0)
    assert single.spread("final_test_acc").median == pytest.approx(0.45)


def test_no_speedup_between_gpu_models_and_the_cell_says_why():
    groups = summary.group_runs([gpu_record("s", "Tesla V100-SXM2-16GB"), gpu_record("d", "NVIDIA A100-SXM4-40GB", 8)],
                                warn=pytest.fail)
    assert len(summary.by_setup(groups)) == 2 and all(group.speedup is None for group in groups)
    markdown = summary.summary_markdown(groups, Path("r"))
    (row,) = [line for line in markdown.splitlines() if "| distributed |" in line]
    assert "| no 1-GPU baseline on NVIDIA A100-SXM4-40GB |" in row and "×" not in markdown


def test_runs_of_other_speed_settings_share_no_median_and_no_baseline():
    runs = [gpu_record("s1", "H100", epoch_times=(5.0, 1.0, 1.0)), gpu_record("s2", "H100", precision="fp32"),
            gpu_record("d", "H100", 2, precision="fp32", epoch_times=(5.0, 1.0, 1.0)),
            gpu_record("d2", "H100", 2, precision="fp16", epoch_times=(5.0, 1.0, 1.0))]
    groups = summary.group_runs(runs, warn=pytest.fail)
    assert sorted(len(group.runs) for group in groups) == [1, 1, 1, 1]
    fp32 = next(group for group in groups if group.mode == "distributed" and "fp32" in group.settings)
    assert fp32.baseline.runs[0]["run_id"] == "s2" and fp32.speedup == pytest.approx(2.25)
    fp16 = next(group for group in groups if "fp16" in group.settings)
    assert fp16.speedup is None and fp16.no_baseline.startswith("no 1-GPU baseline with fp16, device loader")


def test_cost_is_the_median_of_each_runs_share_of_its_job():
    runs = [record(f"s{i}", sagemaker={"instance_type": "ml.p3.2xlarge", "cost_usd": cost})
            for i, cost in enumerate((1.0, 1.5, 9.0))]
    (group,) = summary.group_runs(runs, warn=pytest.fail)
    assert group.cost == summary.Spread(1.5, 1.0, 9.0)
    assert summary.summary_markdown([group], Path("r")).splitlines()[-1].endswith("| 1.50 (1.00–9.00) |")


def test_imports_neither_matplotlib_nor_torch():
    assert heavy_packages_imported_by("hpml.study.summary") == []


def test_speedup_in_time_to_target_where_both_runs_reached_it():
    def run(run_id, world_size, time_to_target, target=0.5, **more):
        return record(run_id, world_size=world_size, mode="single" if world_size == 1 else "distributed",
                      target_acc=target, time_to_target_s=time_to_target, **more)

    groups = summary.group_runs([run("s", 1, 6.0), run("d", 2, 4.0, epoch_times=(2.0, 1.0, 1.25))],
                                warn=pytest.fail)
    assert groups[1].speedup == pytest.approx(2.0) and groups[1].target_speedup == pytest.approx(1.5)
    rows = summary.summary_markdown(groups, Path("results")).splitlines()
    assert rows[-2].endswith("| 6.0 to 50% | baseline | — | — |")
    assert rows[-1].endswith("| 4.0 to 50% | 1.50× | — | — |")
    never = summary.group_runs([run("s", 1, 6.0), run("d", 2, None)], warn=pytest.fail)
    assert never[1].target_speedup is None
    assert summary.summary_markdown(never, Path("results")).splitlines()[-1].endswith("| not reached | — | — | — |")
    other_target = summary.group_runs([run("s", 1, 6.0), run("d", 2, 3.0, target=0.4)], warn=pytest.fail)
    assert other_target[1].target_speedup is None
    assert summary.summary_markdown(summary.group_runs([record()], warn=pytest.fail), Path("r")).endswith(
        "| — | — | — |\n")


def test_each_gradient_communication_is_its_own_series():
    def ddp(run_id: str, **config) -> dict:
        run = record(run_id, mode="distributed", backend="gloo", world_size=2)
        return {**run, "config": {**run["config"], **config}}

    groups = summary.group_runs([record("s1"), ddp("d1"), ddp("d2", grad_compression="fp16"),
                                 ddp("d3", grad_compression="powersgd", bucket_cap_mb=1.0, static_graph=True)],
                                warn=pytest.fail)
    assert [summary.label(group) for group in groups] == [
        "1 CPU process (single)", "2 CPU processes (DDP, gloo)", "2 CPU processes (DDP, gloo, fp16)",
        "2 CPU processes (DDP, gloo, powersgd, 1 MB buckets, static graph)"]
    assert all(group.baseline is groups[0] for group in groups[1:])


def test_a_results_folder_that_is_not_utf8_is_named_with_escapes():
    folder = Path(os.fsdecode(b"runs-\xe9"))  # a byte UTF-8 cannot decode: held as a lone surrogate
    markdown = summary.summary_markdown(summary.group_runs([record()], warn=pytest.fail), folder)
    assert "from `runs-\\xe9`" in markdown and markdown.encode("utf-8")


def test_a_size_or_batch_a_record_leaves_out_is_left_out():
    runs = [record("s", data={"train_size": 400}, batch_size=8), record("d", mode="distributed", world_size=2)]
    groups = summary.group_runs(runs, warn=pytest.fail)
    assert [group.workload for group in groups] == ["unknown data; 3 epochs"] * 2
    assert "Batch: 8 images per process and step" in summary.setup_lines(groups)


def test_accuracy_columns_are_percent_medians_with_their_range():
    runs = [record(f"s{i}", epoch_times=(4.0, 2.0, 2.0), final_test_acc=final, best_test_acc=best)
            for i, (final, best) in enumerate(((0.40, 0.50), (0.45, 0.55), (0.60, 0.62)))]
    (group,) = summary.group_runs(runs, warn=pytest.fail)
    row = dict(zip(summary.SUMMARY_COLUMNS, summary.summary_row(group), strict=True))
    assert row["final acc (%)"] == "45.0 (40.0–60.0)" and row["best acc (%)"] == "55.0 (50.0–62.0)"
    assert row["epoch time (s)"] == "2.00"  # equal runs: one number, in the column's format
    assert "3 runs from `r`, in 1 group," in summary.summary_markdown([group], Path("r"))


def test_runs_of_other_data_or_length_share_no_group_and_no_baseline():
    cifar = {"description": "CIFAR-10", "train_size": 50000, "test_size": 10000}
    assert summary.workload_of(record(data=cifar)) == "CIFAR-10; 50,000 train / 10,000 test images, 3 epochs"
    assert summary.workload_of(record(config={"dataset": "synthetic"})) == "synthetic; 3 epochs"
    assert summary.workload_of(record()) == "unknown data; 3 epochs"
    runs = [record("full", data=cifar), record("subset", data={**cifar, "train_size": 5000}),
            record("synthetic", data={**cifar, "description": "synthetic"}),
            record("cifar10", config={"dataset": "cifar10"}), record("synthetic2", config={"dataset": "synthetic"}),
            record("longer", data=cifar, epoch_times=(4.0, 2.0, 2.0, 2.0)),
            record("ddp", mode="distributed", backend="gloo", world_size=2, data=cifar,
                   epoch_times=(4.0, 2.0, 2.0, 2.0, 2.0))]
    groups = summary.group_runs(runs, warn=pytest.fail)
    assert [len(group.runs) for group in groups] == [1] * 7
    (ddp,) = [group for group in groups if group.mode == "distributed"]
    assert ddp.speedup is None
    assert ddp.no_baseline == "no single-process baseline of CIFAR-10; 50,000 train / 10,000 test images, 5 epochs"
    assert ", 5,000/50,000 training images · 3/4/5 epochs ·" in summary.title_tag(groups)


def test_platform_nodes_and_model_keep_runs_apart():
    runs = [gpu_record("s", "H100"), gpu_record("vgg", "H100", model="vgg16"), gpu_record("own", "H100", model="mine"),
            gpu_record("sm", "H100", 8, sagemaker={"instance_type": "ml.p4d.24xlarge"}),
            gpu_record("one", "H100", 8), gpu_record("two", "H100", 8, nodes=2)]
    groups = summary.group_runs(runs, warn=pytest.fail)
    assert [(group.platform, group.model, summary.label(group)) for group in groups] == [
        ("SageMaker", "resnet18", "8 GPUs (DDP, nccl)"), ("local", "vgg16", "1 GPU (single)"),
        ("local", "resnet18", "1 GPU (single)"), ("local", "resnet18", "8 GPUs (DDP, nccl)"),
        ("local", "resnet18", "8 GPUs on 2 nodes (DDP, nccl)"), ("local", "mine", "1 GPU (single)")]
    assert groups[0].no_baseline == "no 1-GPU baseline on SageMaker"
    assert groups[3].baseline is groups[2] and groups[4].baseline is groups[2]


def test_a_group_that_mixes_batch_sizes_says_so():
    warnings = []
    (group,) = summary.group_runs([record("a", batch_size=128), record("b", config={"batch_size": 256})],
                                  warn=warnings.append)
    assert warnings == ["1 CPU process (single) of resnet18 mixes runs with different batch_size (128, 256); "
                        "its medians span them"]
    assert "Batch: 128/256 images per process and step" in summary.setup_lines([group])


def test_only_a_single_run_is_a_baseline_and_one_nothing_is_compared_with_shows_no_speedup():
    one_rank, two_ranks = (record(f"d{n}", mode="distributed", backend="gloo", world_size=n) for n in (1, 2))
    assert all(group.baseline is None for group in summary.group_runs([one_rank, two_ranks], warn=pytest.fail))
    (alone,) = summary.group_runs([record()], warn=pytest.fail)
    row = dict(zip(summary.SUMMARY_COLUMNS, summary.summary_row(alone), strict=True))
    assert not alone.compared and row["speedup"] == row["speedup incl. warm-up"] == "—"
