"""hpml.scaling's ring all-reduce model, and bench/scaling.py checking it and drawing its projection."""

import json

import pytest

from hpml import scaling
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
