"""hpml.study.scaling's ring all-reduce model, and bench/scaling.py checking it and drawing its projection."""

import json
import sys

import pytest

from hpml.study import scaling
from tests.helpers import exit_code_of, refusal, script_main

LINK = scaling.Link(latency_s=1e-5, bandwidth_bytes_per_s=1e9, source="stated for the test")


def test_a_ring_all_reduce_costs_latency_rounds_and_bus_traffic():
    assert LINK.allreduce_s(1e9, 1) == 0.0
    assert LINK.allreduce_s(1e9, 2) == pytest.approx(2 * 1e-5 + 1.0)  # 2 rounds; 2(n-1)/n = 1
    assert LINK.allreduce_s(1e9, 8) == pytest.approx(14 * 1e-5 + 1.75)


def test_overlap_hides_communication_behind_the_backward_pass_only():
    compute = 0.3  # the backward pass: 0.2 s
    assert scaling.step_s(compute, 1e8, 2, LINK, overlap=False) == pytest.approx(0.3 + 0.1 + 2e-5)
    assert scaling.step_s(compute, 1e8, 2, LINK, overlap=True) == pytest.approx(0.3)  # 0.1 s hides in 0.2 s
    assert scaling.step_s(compute, 1e9, 2, LINK, overlap=True) == pytest.approx(0.3 + 1.0 + 2e-5 - 0.2)
    assert scaling.speedup(compute, 1e8, 2, LINK, overlap=True) == pytest.approx(2.0)
    assert scaling.speedup(compute, 1e9, 2, LINK, overlap=False) < 2 * compute / (compute + 1.0) + 1e-3


def test_a_link_fitted_to_an_allreduce_table_reads_latency_small_and_bandwidth_large():
    rows = [{"bytes": size, "time_us": 100.0 + size / 2e3, "busbw_gbps": size / (100.0 + size / 2e3) / 1e3}
            for size in (8 * 2**k for k in range(25))]
    link = scaling.fit_link(rows, ranks=2, source="fit")
    assert link.latency_s == pytest.approx(50e-6, rel=0.01)  # 100 us over 2 rounds
    assert link.bandwidth_bytes_per_s == pytest.approx(2e9, rel=0.05)


def test_a_link_is_fitted_to_the_medians_of_the_three_smallest_and_the_three_largest_messages():
    rows = [{"bytes": size, "time_us": time_us, "busbw_gbps": bus_gbps} for size, time_us, bus_gbps in
            ((2**22, 1100.0, 5.0), (8, 30.0, 0.0), (64, 600.0, 0.1), (2**20, 900.0, 4.0), (32, 90.0, 0.1),
             (16, 60.0, 0.0), (2**21, 1000.0, 6.0))]
    link = scaling.fit_link(rows, ranks=4, source="four ranks")
    assert link.latency_s == pytest.approx(60e-6 / 6)  # the median time, over the 6 rounds of 4 ranks
    assert link.bandwidth_bytes_per_s == pytest.approx(5e9) and link.source == "four ranks"


def test_bench_checks_the_model_and_draws_its_projection(tmp_path, capsys):
    allreduce = {"backend": "gloo", "world_size": 2,
                 "sizes": [{"bytes": 8 * 2**k, "time_us": 100.0 + 8 * 2**k / 1e3,
                            "busbw_gbps": 8 * 2**k / (100.0 + 8 * 2**k / 1e3) / 1e3} for k in range(22)]}
    ddp = {"backend": "gloo", "world_size": 2, "device": "cpu: test",
           "models": {"shufflenetv2": {"none": {"step_ms": 120.0, "no_sync_step_ms": 100.0}}}}
    single = {"device": "GPU X", "batch_size": 128, "models": {"resnet18": {"fast_images_per_s": 12800.0}}}
    paths = {name: tmp_path / f"{name}.json" for name in ("allreduce", "ddp", "single")}
    for name, report in (("allreduce", allreduce), ("ddp", ddp), ("single", single)):
        paths[name].write_text(json.dumps(report))
    figure, out = tmp_path / "img" / "Scaling.png", tmp_path / "scaling.json"
    argv = [f"--{name}={path}" for name, path in paths.items()] + ["--figure", str(figure), "--json", str(out)]
    assert exit_code_of(script_main("bench/scaling.py"), argv) == 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out.read_text())
    checked = report["check"]["models"]["shufflenetv2"]
    # 5.0 MB of fp32 gradients over a 1 GB/s link: 5 ms, hidden behind 67 ms of backward pass
    assert checked["predicted_step_ms"] == pytest.approx(100.0)
    assert checked["predicted_step_ms_no_overlap"] == pytest.approx(100.0 + 5.0, abs=0.5)
    assert checked["error"] == pytest.approx(100.0 / 120.0 - 1)
    curve = report["projection"]["speedup"]["resnet18"]
    assert report["projection"]["ranks"] == [1, 2, 4, 8, 16, 32, 64] and curve["True"][0] == pytest.approx(1.0)
    assert all(a <= b * 1.0001 for a, b in zip(curve["False"], curve["True"], strict=True))  # overlap never hurts
    assert "shufflenetv2" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    ([], "give --allreduce and --ddp (a check), --single (a projection), or all three"),
    (["--ddp", "x.json"], "--ddp and --allreduce go together"),
    (["--single", "/nonexistent/s.json"], "/nonexistent/s.json: no such file"),
])
def test_bench_refuses_missing_inputs_in_one_line(argv, message, capsys):
    assert message in refusal(script_main("bench/scaling.py"), argv, capsys)


def test_the_projection_beyond_one_node_runs_on_the_inter_node_link(monkeypatch):
    bench = sys.modules[script_main("bench/scaling.py").__module__]
    fast, slow = scaling.Link(5e-6, 300e9, "fast"), scaling.Link(5e-6, 1e9, "slow")
    monkeypatch.setitem(bench.STATED_LINKS, "one fast link", (fast, fast))
    monkeypatch.setitem(bench.STATED_LINKS, "slow between nodes", (fast, slow))
    single = {"device": "GPU X", "batch_size": 128, "models": {"resnet18": {"fast_images_per_s": 12800.0}}}
    equal, slower = (bench.project(single, name) for name in ("one fast link", "slow between nodes"))
    assert slower["links"] == ["fast", "slow"]
    for overlap in ("True", "False"):  # 45 MB of gradients: 84 ms at 16 GPUs over 1 GB/s, 10 ms of compute
        pairs = zip(bench.PROJECTED_RANKS, equal["speedup"]["resnet18"][overlap],
                    slower["speedup"]["resnet18"][overlap], strict=True)
        for ranks, on_equal_links, on_a_slow_inter_node_link in pairs:
            if ranks <= bench.GPUS_PER_NODE:
                assert on_a_slow_inter_node_link == on_equal_links
            else:
                assert on_a_slow_inter_node_link < on_equal_links / 5
