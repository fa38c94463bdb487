"""hpml.summary: results grouped for comparison and the summary table, without matplotlib or torch."""

from pathlib import Path

import pytest

from hpml import summary
from tests.helpers import heavy_packages_imported_by, record


def test_medians_and_ranges_of_repeated_runs():
    spread = summary.Spread.of([3.0, 10.0, 4.0])
    assert (spread.median, spread.low, spread.high) == (4.0, 3.0, 10.0)
    assert spread.text(".1f") == "4.0 (3.0–10.0)" and summary.Spread.of([2.0, 2.0]).text(".1f") == "2.0"


def test_a_distributed_group_is_compared_with_the_single_device_group():
    single = [record("s1"), record("s2", total_train_time_s=9.5)]
    distributed = record("d1", mode="distributed", backend="gloo", world_size=2, total_train_time_s=4.5)
    groups = summary.group_runs([distributed, *single], warn=pytest.fail)
    assert [(group.mode, len(group.runs)) for group in groups] == [("single", 2), ("distributed", 1)]
    assert groups[1].baseline is groups[0] and groups[0].compared
    assert groups[1].speedup == pytest.approx(9.0 / 4.5) and groups[1].efficiency == pytest.approx(1.0)
    markdown = summary.summary_markdown(groups, Path("results"))
    assert "| resnet18 | single | — | 1 | cpu | 3 | 2 | 9.0 (8.5–9.5) |" in markdown
    assert "| 2.00× | 100% |" in markdown and "| baseline | — |" in markdown


def test_imports_neither_matplotlib_nor_torch():
    assert heavy_packages_imported_by("hpml.summary") == []


def test_speedup_in_time_to_target_where_both_runs_reached_it():
    def run(run_id, world_size, time_to_target, target=0.5, **more):
        return record(run_id, world_size=world_size, mode="single" if world_size == 1 else "distributed",
                      target_acc=target, time_to_target_s=time_to_target, **more)

    groups = summary.group_runs([run("s", 1, 6.0), run("d", 2, 4.0, total_train_time_s=4.25)], warn=pytest.fail)
    assert groups[1].speedup == pytest.approx(2.0) and groups[1].target_speedup == pytest.approx(1.5)
    rows = summary.summary_markdown(groups, Path("results")).splitlines()
    assert rows[-2].endswith("| 6.0 to 50% | baseline |") and rows[-1].endswith("| 4.0 to 50% | 1.50× |")
    never = summary.group_runs([run("s", 1, 6.0), run("d", 2, None)], warn=pytest.fail)
    assert never[1].target_speedup is None
    assert summary.summary_markdown(never, Path("results")).splitlines()[-1].endswith("| not reached | — |")
    other_target = summary.group_runs([run("s", 1, 6.0), run("d", 2, 3.0, target=0.4)], warn=pytest.fail)
    assert other_target[1].target_speedup is None
    assert summary.summary_markdown(summary.group_runs([record()], warn=pytest.fail), Path("r")).endswith("| — | — |\n")


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
