#!/usr/bin/env python3
"""Data-parallel scaling predicted by a ring all-reduce model, checked against measurement, projected to GPUs.

    torchrun --nproc_per_node 2 bench/allreduce.py --json ar.json
    torchrun --nproc_per_node 2 bench/throughput.py --ddp --json ddp.json
    python bench/scaling.py --allreduce ar.json --ddp ddp.json --single bench/measured/throughput_all_models_h200.json

Check: for each model in the --ddp measurement, the step time the model (hpml/study/scaling.py) predicts with nothing
hidden, from the measured step without synchronisation (compute), the model's fp32 gradient bytes and the link fitted
to the --allreduce table of the same world, against the step measured with synchronisation. That prediction is the
test of the fitted link: it is compared with a measurement it does not contain. The prediction with overlap is
reported beside it but is not a test: when the all-reduce fits in the assumed backward pass it is the no-sync
measurement itself, by construction. With --ddp's repeats (paired rounds), the check's error comes with its range.

Projection: speedup for 1 to 64 GPUs from a measured single-GPU throughput (--single: bench/throughput.py's JSON, the
fast setup) on a stated link (--link), with and without overlap. It pairs step times measured on one machine with
links stated for another: a what-if, not a measurement of any one machine, and the figure and JSON name both. The
figure marks measured points as measured and labels every projected curve as a model with its assumptions.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import models  # noqa: E402
from hpml import cli, files, results  # noqa: E402
from hpml.errors import UsageError  # noqa: E402
from hpml.study import scaling  # noqa: E402

GPUS_PER_NODE = 8
# AWS's ml.p4d.24xlarge: 8 A100s on NVSwitch (600 GB/s bidirectional per GPU, so 300 GB/s each way) and 400 Gbps
# of EFA per instance. The latencies are assumptions, not measurements.
STATED_LINKS = {
    "p4d": (scaling.Link(5e-6, 300e9, "ml.p4d.24xlarge NVSwitch, 300 GB/s each way (AWS); 5 us assumed"),
            scaling.Link(15e-6, 50e9, "ml.p4d.24xlarge EFA, 400 Gbps per instance (AWS); 15 us assumed")),
}
# The hardware each stated link belongs to, named beside the hardware the projected step times were measured on.
LINK_HARDWARE = {"p4d": "AWS ml.p4d.24xlarge (8 NVIDIA A100 per node)"}
PROJECTED_RANKS = (1, 2, 4, 8, 16, 32, 64)
NOT_A_TEST = ("not a test: equals the no-sync measurement by construction when communication hides, that is when "
              "communication_ms fits in the assumed backward pass, hpml.study.scaling.BACKWARD_SHARE of compute_ms")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allreduce", type=cli.path_flag, help="bench/allreduce.py's JSON, for the check's link")
    parser.add_argument("--ddp", type=cli.path_flag,
                        help="bench/throughput.py --ddp's JSON of the same world, to check")
    parser.add_argument("--single", type=cli.path_flag,
                        help="bench/throughput.py's JSON of one GPU, to project from")
    parser.add_argument("--link", choices=tuple(STATED_LINKS), default="p4d",
                        help="the stated interconnect of the projection: 8 GPUs per node on its intra-node link, "
                             "more across its inter-node link (default: %(default)s)")
    parser.add_argument("--figure", type=cli.path_flag, default=Path("results_img/Scaling.png"),
                        help="the figure to write (default: %(default)s)")
    parser.add_argument("--json", type=cli.path_flag, help="also write the predictions as JSON here")
    args = parser.parse_args(argv)
    if bool(args.ddp) != bool(args.allreduce):
        raise UsageError("--ddp and --allreduce go together: the check needs the step times and the link of one world")
    if not args.ddp and not args.single:
        raise UsageError("give --allreduce and --ddp (a check), --single (a projection), or all three")
    for path in filter(None, (args.allreduce, args.ddp, args.single)):
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
    files.check_output_file(args.figure, "--figure")
    if args.json:
        files.check_output_file(args.json, "--json")
    return args


def read_json(path: Path, *keys: str) -> dict:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: not readable JSON ({type(error).__name__}: {error})") from None
    missing = [key for key in keys if not isinstance(report, dict) or key not in report]
    if missing:
        raise UsageError(f"{path}: not the JSON this needs (no {', '.join(missing)})")
    return report


def gradient_bytes(name: str) -> int:
    """fp32 gradients, as DDP all-reduces them."""
    return 4 * sum(p.numel() for p in models.build(name).parameters())


def measured_on(report: dict) -> str:
    """The hardware a bench JSON was measured on, from its environment: the GPU, else the CPU and its cores."""
    environment = report.get("environment") or {}
    if environment.get("gpu"):
        return str(environment["gpu"])
    if environment.get("cpu"):
        return f"{environment['cpu']}, {environment.get('cpu_count', '?')} cores, no GPU"
    return str(report.get("device", "unrecorded"))


def check(allreduce: dict, ddp: dict) -> dict:
    """Predicted against measured step time, per model, for the world both files were measured in.

    The test is predicted_step_ms_no_overlap: the measured no-sync step plus the fitted link's all-reduce, against the
    measured synchronised step (error_no_overlap; its per-repeat range pairs the synced and no-sync epochs of one
    round). predicted_step_ms (with overlap) and its error are not a test when overlap_is_a_test is false."""
    ranks = ddp["world_size"]
    if allreduce["world_size"] != ranks:
        raise UsageError(f"the all-reduce table is of {allreduce['world_size']} ranks, the --ddp measurement of "
                         f"{ranks}: measure both in one world")
    link = scaling.fit_link(allreduce["sizes"], ranks, f"fitted to bench/allreduce.py ({allreduce['backend']})")
    figures = {}
    for name, by_compression in ddp["models"].items():
        if "none" not in by_compression:
            continue
        measured = by_compression["none"]
        compute, grads = measured["no_sync_step_ms"] / 1e3, gradient_bytes(name)
        communication = link.allreduce_s(grads, ranks)
        predicted = {overlap: scaling.step_s(compute, grads, ranks, link, overlap) * 1e3 for overlap in (True, False)}
        figures[name] = {"measured_step_ms": measured["step_ms"], "compute_ms": compute * 1e3,
                         "exposed_ms": measured["step_ms"] - compute * 1e3, "communication_ms": communication * 1e3,
                         "gradient_bytes": grads,
                         "predicted_step_ms_no_overlap": predicted[False],
                         "error_no_overlap": predicted[False] / measured["step_ms"] - 1,
                         **per_repeat(measured.get("repeats_step_ms"), communication * 1e3),
                         "predicted_step_ms": predicted[True], "error": predicted[True] / measured["step_ms"] - 1,
                         "overlap_is_a_test": communication > scaling.BACKWARD_SHARE * compute}
    return {"ranks": ranks, "backend": ddp["backend"], "device": ddp["device"], "measured_on": measured_on(ddp),
            "link": {"latency_us": link.latency_s * 1e6, "bus_gbps": link.bandwidth_bytes_per_s / 1e9,
                     "source": link.source, "measured_on": measured_on(allreduce)},
            "test": "predicted_step_ms_no_overlap (measured no-sync step + the fitted link's all-reduce, nothing "
                    "hidden) against measured_step_ms: error_no_overlap",
            "with_overlap": f"predicted_step_ms and error: {NOT_A_TEST}; overlap_is_a_test says, per model, "
                            "whether it hid",
            "models": figures}


def per_repeat(repeats: dict | None, communication_ms: float) -> dict:
    """The spread over --ddp's rounds, each a synced and a no-sync epoch run back to back: exposed communication
    (synced - no-sync) and the check's error, per round, and whether those errors straddle zero (within noise)."""
    if not repeats or not repeats.get("synced") or len(repeats["synced"]) != len(repeats.get("no_sync", ())):
        return {}
    rounds = list(zip(repeats["synced"], repeats["no_sync"], strict=True))
    errors = [(alone + communication_ms) / synced - 1 for synced, alone in rounds]
    return {"measured_step_ms_per_repeat": [synced for synced, _ in rounds],
            "compute_ms_per_repeat": [alone for _, alone in rounds],
            "exposed_ms_per_repeat": [synced - alone for synced, alone in rounds],
            "error_no_overlap_per_repeat": errors,
            "error_no_overlap_within_noise": min(errors) <= 0 <= max(errors)}


def project(single: dict, link_name: str) -> dict:
    """Speedup over one GPU for PROJECTED_RANKS, per model, with and without overlap: step times measured on the
    --single JSON's hardware, communication on the links stated for `link_name`'s, a what-if pairing of the two."""
    intra, inter = STATED_LINKS[link_name]
    curves = {}
    for name, measured in single["models"].items():
        compute, grads = single["batch_size"] / measured["fast_images_per_s"], gradient_bytes(name)
        curves[name] = {
            str(overlap): [scaling.speedup(compute, grads, n, intra if n <= GPUS_PER_NODE else inter, overlap)
                           for n in PROJECTED_RANKS] for overlap in (True, False)}
    step_hardware, link_hardware = measured_on(single), LINK_HARDWARE.get(link_name, f"the stated {link_name!r} links")
    return {"device": single["device"], "step_time_measured_on": step_hardware, "link_hardware": link_hardware,
            "what_if": f"step times measured on {step_hardware}, communication on the links stated for "
                       f"{link_hardware}: a pairing of two machines, not a measurement of any one",
            "batch_size": single["batch_size"], "ranks": list(PROJECTED_RANKS),
            "links": [intra.source, inter.source], "speedup": curves}


def draw(checked: dict | None, projected: dict | None, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hpml.study import plots

    panels = [p for p in (checked, projected) if p]
    figure, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False, layout="constrained")
    axes = list(axes[0])
    if checked:
        ax, names = axes.pop(0), list(checked["models"])
        positions = range(len(names))
        rows = [checked["models"][n] for n in names]
        for key, marker, label, shift in (("measured_step_ms", "o", "measured synced step", -0.12),
                                          ("compute_ms", "s", "measured no-sync step", 0.12)):
            medians = [m[key] for m in rows]
            repeats = [m.get(f"{key}_per_repeat") or [m[key]] for m in rows]
            below, above = ([abs(bound(r) - m) for m, r in zip(medians, repeats, strict=True)] for bound in (min, max))
            ax.errorbar([x + shift for x in positions], medians, yerr=[below, above],
                        fmt=marker, ms=8 if marker == "o" else 6, mfc=None if marker == "o" else "none", capsize=4,
                        label=f"{label} (median, min–max over repeats)")
        ax.plot(positions, [m["predicted_step_ms_no_overlap"] for m in rows], "+", ms=11, mew=2,
                label="the check: no-sync step + fitted link, nothing hidden")
        ax.plot([x + 0.12 for x in positions], [m["predicted_step_ms"] for m in rows], "x", ms=7, color="grey",
                label="model with overlap: not a test\n(= the no-sync step when communication hides)")
        ax.set_xticks(list(positions), names)
        ax.set_yscale("log")
        ax.set_ylabel("step time (ms)")
        ax.set_title(f"Check: {checked['ranks']} ranks, {checked['backend']}, {checked['measured_on']}\n"
                     f"link {checked['link']['bus_gbps']:.2f} GB/s, {checked['link']['latency_us']:.0f} us "
                     f"({checked['link']['source']})", fontsize=9)
        ax.legend(fontsize=7)
    if projected:
        ax = axes.pop(0)
        ranks = projected["ranks"]
        ax.plot(ranks, ranks, color="grey", lw=1, label="linear")
        for name, curves in projected["speedup"].items():
            (line,) = ax.plot(ranks, curves["True"], "-", label=f"{name} (model, with overlap)")
            ax.plot(ranks, curves["False"], "--", color=line.get_color(), lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("GPUs")
        ax.set_ylabel("speedup over one GPU (projected; dashed: no overlap)")
        ax.set_title(f"What-if, not a measurement of any one machine: step times measured on one\n"
                     f"{projected['step_time_measured_on']} (batch {projected['batch_size']}), links stated for "
                     f"{projected['link_hardware']}\n{projected['links'][0]}\nbeyond 8 GPUs: {projected['links'][1]}",
                     fontsize=8)
        ax.legend(fontsize=7)
    return plots.save_figure(figure, path, dpi=150)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    checked = check(read_json(args.allreduce, "sizes", "world_size", "backend"),
                    read_json(args.ddp, "models", "world_size", "backend", "device")) if args.ddp else None
    projected = project(read_json(args.single, "models", "batch_size", "device"), args.link) if args.single else None
    if checked:
        print(f"check: {checked['ranks']} ranks, {checked['backend']}, {checked['measured_on']}; link "
              f"{checked['link']['bus_gbps']:.2f} GB/s, {checked['link']['latency_us']:.0f} us "
              f"({checked['link']['source']})")
        print("the test: measured no-sync step + the fitted link's all-reduce, nothing hidden, against the measured "
              "synced step (error: median; range: per repeat)")
        print(f"{'model':<14}{'measured ms':>12}{'no-sync ms':>11}{'comm ms':>9}{'predicted ms':>14}{'error':>8}"
              f"  range")
        for name, m in checked["models"].items():
            errors = m.get("error_no_overlap_per_repeat")
            spread = (f"  {min(errors):+.1%} to {max(errors):+.1%}"
                      f"{' (within noise)' if m['error_no_overlap_within_noise'] else ''}") if errors else "  —"
            print(f"{name:<14}{m['measured_step_ms']:>12.1f}{m['compute_ms']:>11.1f}{m['communication_ms']:>9.1f}"
                  f"{m['predicted_step_ms_no_overlap']:>14.1f}{m['error_no_overlap']:>+8.1%}{spread}")
        print(f"with overlap, {NOT_A_TEST}:")
        for name, m in checked["models"].items():
            print(f"{name:<14}{m['predicted_step_ms']:>12.1f} ms"
                  f"{'' if m['overlap_is_a_test'] else '  = the no-sync step: communication hid'}")
    if projected:
        print(f"\nprojected speedup (with overlap) for {', '.join(map(str, projected['ranks']))} GPUs; "
              f"{projected['what_if']}")
        for name, curves in projected["speedup"].items():
            print(f"{name:<14}" + "".join(f"{value:>7.1f}" for value in curves["True"]))
    print(f"-> {draw(checked, projected, args.figure)}")
    if args.json:
        results.write_json_atomic(args.json, {"check": checked, "projection": projected})
        print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    cli.run_script(main)
