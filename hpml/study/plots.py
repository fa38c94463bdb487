"""The study's figures, drawn from grouped results (hpml.study.summary) and the monitor samples beside them.

Figures draw one panel per setup (platform, hardware, speed settings and workload), so that only comparable bars
stand side by side. make_all writes the figures and summary.md, each through a temp file and a rename.
"""

from __future__ import annotations

import statistics
import sys
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure, SubFigure

from hpml import cli, files, monitor, results
from hpml.errors import UsageError
from hpml.study.summary import (
    STEP_PARTS,
    Group,
    Spread,
    by_setup,
    group_runs,
    label,
    model_names,
    setup_lines,
    short_setup,
    summary_markdown,
    title_tag,
)

OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
HATCHES = ("", "//", "..", "xx")
Lines = dict[str, tuple[list[float], list[float]]]


# ---- figures -----------------------------------------------------------------------------------

def new_figure(width: float, height: float, title: str, groups: list[Group], notes: Iterable[str] = ()) -> SubFigure:
    """The area to draw in, inside a figure whose title names the hardware and data and whose footer gives details.

    A subfigure, so that constrained layout stacks title, legend ("outside upper center" of the subfigure),
    axes and footer without overlaps.
    """
    figure = Figure(figsize=(width, height), layout="constrained")
    figure.suptitle(f"{title}\n{textwrap.fill(title_tag(groups), int(width * 12), break_on_hyphens=False)}",
                    fontsize=11)
    footer = [wrapped for line in [*setup_lines(groups), *notes] for wrapped in textwrap.wrap(line, int(width * 16))]
    figure.supxlabel("\n".join(footer), x=0.01, ha="left", fontsize=7.5, color="#333333")
    return figure.subfigures(1, 1)


def add_legend(body: SubFigure, entries: int) -> None:
    body.legend(loc="outside upper center", ncols=min(4, entries), fontsize=8, frameon=False)


def colours(groups: list[Group]) -> dict[tuple, tuple[str, str]]:
    """Colour and hatch per series, in series order (single first): the same in every figure."""
    series = sorted({group.series for group in groups})
    return {key: (OKABE_ITO[i % len(OKABE_ITO)], HATCHES[i // len(OKABE_ITO) % len(HATCHES)])
            for i, key in enumerate(series)}


def bar_positions(panel: list[Group]) -> dict[int, float]:
    """x of each group's bar: models at 0, 1, 2...; the panel's series side by side within a model."""
    names, series = model_names(panel), sorted({group.series for group in panel})
    width = 0.8 / len(series)
    return {id(group): names.index(group.model) - 0.4 + width * (series.index(group.series) + 0.5)
            for group in panel}


def bar_width(panel: list[Group]) -> float:
    return 0.8 / len({group.series for group in panel}) * 0.92


def bar_panels(body: SubFigure, groups: list[Group], ylabel: str, value: Callable[[Group], Spread],
               annotate: Callable[[Group, Spread], str | None],
               label_above: Callable[[Group], float] | None = None) -> list[tuple[Axes, list[Group]]]:
    """One axes per setup: bars per model and series, min-max error bars, a label above each bar (above its
    error bar, or above `label_above(group)` when that is higher)."""
    palette, panels = colours(groups), by_setup(groups)
    axes = body.subplots(len(panels), 1, squeeze=False)[:, 0]
    seen = set()
    for ax, panel in zip(axes, panels, strict=True):
        positions, width = bar_positions(panel), bar_width(panel)
        for group in panel:
            x, spread = positions[id(group)], value(group)
            colour, hatch = palette[group.series]
            ax.bar(x, spread.median, width, color=colour, hatch=hatch, edgecolor="white",
                   label=None if group.series in seen else label(group))
            seen.add(group.series)
            if spread.high > spread.low:
                ax.errorbar(x, spread.median, yerr=[[spread.median - spread.low], [spread.high - spread.median]],
                            color="black", capsize=3, linewidth=1)
            text = annotate(group, spread)
            if text:
                y = max(spread.high, label_above(group)) if label_above else spread.high
                ax.annotate(text, (x, y), xytext=(0, 4), textcoords="offset points", ha="center",
                            va="bottom", fontsize=7.5)
        names = model_names(panel)
        ax.set_xticks(range(len(names)), names)
        ax.set_xlim(-0.6, len(names) - 0.4)
        top = max(value(group).high for group in panel)
        ax.set_ylim(0, top * 1.3 if top > 0 else 1)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        if len(panels) > 1:
            ax.set_title(title_tag(panel), fontsize=9)
    axes[-1].set_xlabel("model")
    return list(zip(axes, panels, strict=True))


def bar_figure_size(groups: list[Group]) -> tuple[float, float]:
    panels = by_setup(groups)
    width = max(1.5 + len(model_names(panel)) * max(1.4, 0.62 * len({g.series for g in panel})) for panel in panels)
    return max(7.5, width), 2.0 + 3.3 * len(panels)


def median_note(groups: list[Group]) -> str:
    counts = sorted({len(group.runs) for group in groups})
    runs = "/".join(map(str, counts))
    return f"Bars: median of {runs} run{'s' if counts != [1] else ''} per group; error bars: min–max over the runs."


def time_figure(groups: list[Group]) -> Figure:
    seconds = max(group.spread("total_train_time_s").high for group in groups)
    unit, scale = ("min", 1 / 60) if seconds > 1200 else ("s", 1.0)

    def annotate(group: Group, _: Spread) -> str | None:
        if group.speedup is None:
            return "no baseline" if group.mode != "single" else None
        return f"×{group.speedup:.2f} steady\n{group.efficiency:.0%} eff.\n×{group.total_speedup:.2f} total"

    body = new_figure(*bar_figure_size(groups), "Training time per model", groups, [
        median_note(groups),
        "Bars: total training time, the first epoch's warm-up included (evaluation excluded). Above the "
        "data-parallel bars: the steady-state speedup (median epoch time after the first epoch, over the "
        "single-device run's of the same model, hardware, speed settings and data), its scaling efficiency "
        "(speedup ÷ world size), and the speedup in total time. 'no baseline': no single-device run of that setup "
        "(summary.md says which part differs)."])
    bar_panels(body, groups, f"total training time ({unit}, lower is better)",
               lambda group: group.spread("total_train_time_s").scaled(scale), annotate)
    add_legend(body, len(colours(groups)))
    return body.figure


def accuracy_figure(groups: list[Group]) -> Figure:
    body = new_figure(*bar_figure_size(groups), "Test accuracy per model", groups, [
        median_note(groups).replace("Bars:", "Bars: final-epoch accuracy,"),
        "◆: best accuracy over the epochs (median over the runs)."])
    drawn = bar_panels(body, groups, "test accuracy (%)", lambda group: group.spread("final_test_acc").scaled(100),
                       lambda _, spread: f"{spread.median:.1f}",
                       label_above=lambda group: group.spread("best_test_acc").median * 100)
    for ax, panel in drawn:
        positions = bar_positions(panel)
        for group in panel:
            ax.plot(positions[id(group)], group.spread("best_test_acc").median * 100, marker="D", color="black",
                    markersize=4, linestyle="none", label="best epoch" if group is groups[0] else None)
        top = max(group.spread("best_test_acc").high for group in panel) * 100
        ax.set_ylim(0, min(108, max(top * 1.2, 10)))
    add_legend(body, len(colours(groups)) + 1)
    return body.figure


def speedup_figure(groups: list[Group]) -> Figure:
    """Per model, side by side: training time, speedup and scaling efficiency over the single-device run, final
    accuracy, and the speedup in time to the target accuracy where runs recorded one."""
    def relative(value: Callable[[Group], float | None], scale: float = 1.0) -> Callable[[Group], Spread]:
        def spread(group: Group) -> Spread:
            number = scale * (1.0 if group.compared else value(group) or 0.0)
            return Spread(number, number, number)
        return spread

    metrics = [("epoch time, steady state (s)", lambda group: group.epoch_time, ".2f"),
               ("steady-state speedup (×)", relative(lambda group: group.speedup), ".2f"),
               ("scaling efficiency (%)", relative(lambda group: group.efficiency, 100), ".0f"),
               ("speedup in total time,\nwarm-up included (×)", relative(lambda group: group.total_speedup), ".2f"),
               ("final test accuracy (%)", lambda group: group.spread("final_test_acc").scaled(100), ".1f")]
    if any(group.target_speedup is not None for group in groups):
        metrics.append(("speedup in time to target (×)", relative(lambda group: group.target_speedup), ".2f"))
    width, height = bar_figure_size(groups)
    body = new_figure(width * len(metrics) / 2, height, "Single device vs data-parallel, per model", groups, [
        median_note(groups),
        "Steady-state speedup: the single-device run's median epoch time (epochs after the first) ÷ the run's, "
        "same model, hardware, speed settings and data; efficiency: that speedup ÷ world size; speedup in total "
        "time: with the first epoch's warm-up; time to target: training time until the test accuracy first "
        "reached --target-acc. A bar at 0 has no single-device run of the same setup (or no run reaching the "
        "target) to compare with; summary.md says why."])
    drawn = [bar_panels(column, groups, ylabel, value,
                        lambda group, spread, fmt=fmt: format(spread.median, fmt) if spread.median else None)
             for column, (ylabel, value, fmt) in zip(body.subfigures(1, len(metrics)), metrics, strict=True)]
    for ax, _ in (panel for column in drawn for panel in column):  # five model names side by side in a narrow panel
        for tick in ax.get_xticklabels():
            tick.set(rotation=25, ha="right", rotation_mode="anchor")
    handles, labels = [], []
    for ax, _ in drawn[0]:  # the series' labels are spread over the first metric's panels
        more_handles, more_labels = ax.get_legend_handles_labels()
        handles += more_handles
        labels += more_labels
    body.legend(handles, labels, loc="outside upper center", ncols=min(4, len(labels)), fontsize=8, frameon=False)
    return body.figure


def curve(group: Group, x_of: Callable[[dict], list[float]]) -> tuple[list[float], list[Spread]]:
    """Per epoch: x (median over the runs) and test accuracy in % (median, min, max over the runs)."""
    xs = [statistics.median(values) for values in zip(*(x_of(run) for run in group.runs), strict=True)]
    accs = zip(*([e["test_acc"] * 100 for e in run["epochs"]] for run in group.runs), strict=True)
    return xs, [Spread.of(values) for values in accs]


def epoch_numbers(run: dict) -> list[float]:
    return [e["epoch"] for e in run["epochs"]]


def elapsed_training(run: dict) -> list[float]:
    total, points = 0.0, []
    for epoch in run["epochs"]:
        total += epoch["epoch_time_s"]
        points.append(total)
    return points


def curves_figure(groups: list[Group]) -> Figure:
    """A row per setup and model; test accuracy against epoch (left) and against training time (right)."""
    rows = [[g for g in panel if g.model == name] for panel in by_setup(groups) for name in model_names(panel)]
    several = len(by_setup(groups)) > 1
    palette = colours(groups)
    body = new_figure(10, 1.8 + 2.5 * len(rows), "Test accuracy during training", groups, [
        "Lines: median over the runs of a group; shaded: min–max. Time axis: cumulative training time "
        "(evaluation excluded), so the gap between lines is the time saved."])
    axes = body.subplots(len(rows), 2, squeeze=False, sharey="row")
    seen = set()
    for (left, right), row in zip(axes, rows, strict=True):
        for group in row:
            colour, _ = palette[group.series]
            for ax, x_of in ((left, epoch_numbers), (right, elapsed_training)):
                xs, accs = curve(group, x_of)
                ax.plot(xs, [a.median for a in accs], "-" if group.mode == "single" else "--", color=colour,
                        marker="o", markersize=3, label=None if group.series in seen or ax is right else label(group))
                if len(group.runs) > 1:
                    ax.fill_between(xs, [a.low for a in accs], [a.high for a in accs], color=colour, alpha=0.2,
                                    linewidth=0)
            seen.add(group.series)
        left.set_ylabel(f"{row[0].model}{chr(10) + short_setup(row[0]) if several else ''}\ntest accuracy (%)",
                        fontsize=9)
        left.xaxis.get_major_locator().set_params(integer=True)
        right.set_xlim(0, max(elapsed_training(run)[-1] for group in row for run in group.runs) * 1.05)
        for ax in (left, right):
            ax.grid(alpha=0.3)
            ax.set_ylim(bottom=0)
    axes[-1][0].set_xlabel("epoch")
    axes[-1][1].set_xlabel("training time (s)")
    axes[0][0].set_title("against epoch", fontsize=10)
    axes[0][1].set_title("against wall-clock training time", fontsize=10)
    add_legend(body, len(palette))
    return body.figure


PART_LABELS = ("forward + backward", "optimizer", "data", "exposed communication")  # of STEP_PARTS, in order


def breakdown_figure(groups: list[Group]) -> Figure:
    """Per setup, a stacked bar per model and world size: the mean profiled step's parts (medians over the runs
    with --profile), its total gradient communication as a marker, and the exposed share above it."""
    profiled = [group for group in groups if group.profiled("step_ms") is not None]
    panels = by_setup(profiled)
    body = new_figure(max(7.5, 1.5 + 1.3 * max(map(len, panels))), 2.4 + 3.6 * len(panels),
                      "Where a training step's time goes (--profile)", profiled, [
        "Bars: the mean profiled step of a run, median over the runs with --profile: forward + backward, "
        "optimizer, waiting for data, and gradient communication not hidden behind computation (exposed). "
        "◆: all gradient communication; what of it the exposed segment leaves out ran while computation went on. "
        "Above: the exposed share of the step. Profiled steps run after the timed epochs, under the profiler, and "
        "are a little slower."])
    axes = body.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels, strict=True):
        bottom = [0.0] * len(panel)
        for index, (part, name) in enumerate(zip(STEP_PARTS, PART_LABELS, strict=True)):
            heights = [group.profiled(part).median for group in panel]
            ax.bar(range(len(panel)), heights, 0.6, bottom=bottom, color=OKABE_ITO[index], label=name,
                   edgecolor="white")
            bottom = [low + height for low, height in zip(bottom, heights, strict=True)]
        ax.plot(range(len(panel)), [group.profiled("communication_ms").median for group in panel], marker="D",
                color="black", linestyle="none", markersize=5, label="all communication")
        for x, (group, top) in enumerate(zip(panel, bottom, strict=True)):
            share = group.profiled("exposed_communication_share").median
            ax.annotate(f"{share:.0%} exposed", (x, top), xytext=(0, 4), textcoords="offset points", ha="center",
                        va="bottom", fontsize=7.5)
        ax.set_xticks(range(len(panel)), [f"{group.model}\n{textwrap.fill(label(group), 22)}" for group in panel],
                      fontsize=7.5)
        ax.set_xlim(-0.7, len(panel) - 0.3)
        ax.set_ylim(0, max(bottom) * 1.25)
        ax.set_ylabel("time per step (ms)")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        if len(panels) > 1:
            ax.set_title(title_tag(panel), fontsize=9)
    add_legend(body, len(STEP_PARTS) + 1)
    return body.figure


# ---- utilization -------------------------------------------------------------------------------

def sample_lines(samples: list[dict]) -> tuple[str, Lines]:
    """('GPU', {'GPU 0': (seconds, percent), ...}) when GPU utilization was sampled, else ('CPU', {'host': ...}).

    `samples` are rows of hpml.monitor.read_samples_csv: one per GPU per sample, one per sample without GPUs,
    from one or several ranks. A GPU (or, without GPUs, a host) seen by several ranks is drawn once, from the
    lowest of those ranks.
    """
    gpu_rows = [row for row in samples if row["gpu_util_pct"] is not None]
    kind, rows, column = ("GPU", gpu_rows, "gpu_util_pct") if gpu_rows else ("CPU", samples, "cpu_pct")
    rows = [row for row in rows if row[column] is not None and row["elapsed_s"] is not None]

    def source(row: dict) -> tuple:
        return (row["host"] or "", row["gpu"]) if kind == "GPU" else (row["host"] or "",)

    owner: dict[tuple, int] = {}
    for row in rows:
        owner[source(row)] = min(owner.get(source(row), row["rank"] or 0), row["rank"] or 0)
    several_hosts = len({row["host"] for row in rows}) > 1
    lines: Lines = {}
    for row in sorted(rows, key=lambda row: (source(row), row["elapsed_s"])):
        if (row["rank"] or 0) != owner[source(row)]:
            continue
        name = f"{row['host'] + ' ' if several_hosts else ''}GPU {row['gpu']}" if kind == "GPU" else row["host"]
        xs, ys = lines.setdefault(name or "host", ([], []))
        xs.append(row["elapsed_s"])
        ys.append(row[column])
    return kind, lines


def representative_samples(groups: list[Group], results_dir: Path,
                           warn: Callable[[str], None]) -> list[tuple[Group, dict, str, Lines]]:
    """Per group, the monitor samples of its run with the median training time among the runs that have them."""
    found = []
    for group in groups:
        runs = sorted((run for run in group.runs if (run.get("utilization") or {}).get("samples_csv")),
                      key=lambda run: run["total_train_time_s"])
        for run in runs[len(runs) // 2:] + runs[:len(runs) // 2]:  # the median first, the others if it fails
            path = results_dir / Path(run["utilization"]["samples_csv"]).name
            try:
                kind, lines = sample_lines(monitor.read_samples_csv(path))
            except (OSError, UnicodeDecodeError, ValueError) as error:
                warn(f"{files.shown(path)}: monitor samples not read ({error}); left out of Utilization.png")
                continue
            if lines:
                found.append((group, run, kind, lines))
                break
    return found


def utilization_figure(found: list[tuple[Group, dict, str, Lines]]) -> Figure:
    columns = 1 if len(found) == 1 else 2
    rows = -(-len(found) // columns)
    body = new_figure(6 * columns + 1, 1.8 + 2.6 * rows, "Utilization during training",
                      [group for group, *_ in found], [
        "GPU utilization from NVML (% of time a kernel ran), per GPU; a run without GPU samples shows the "
        "CPU utilization the monitor sampled instead, labelled as such. One run per group: the one with the "
        "median training time among those with samples."])
    axes = body.subplots(rows, columns, squeeze=False).flatten()
    for ax, (group, run, kind, lines) in zip(axes, found, strict=False):
        for index, (name, (xs, ys)) in enumerate(lines.items()):
            ax.plot(xs, ys, color=OKABE_ITO[index % len(OKABE_ITO)], linewidth=1.2, label=name)
        ax.set_title(f"{group.model} · {label(group)}\n{run['run_id']}", fontsize=8.5)
        ax.set_ylabel("GPU utilization (%)" if kind == "GPU" else "host CPU utilization (%)\n(no GPU samples)")
        ax.set_xlabel("time since monitor start (s)")
        ax.set_ylim(0, max(105, max(max(ys) for _, ys in lines.values()) * 1.05))
        ax.grid(alpha=0.3)
        if 1 < len(lines) <= 8:
            ax.legend(fontsize=7, loc="best")
    for ax in axes[len(found):]:
        ax.set_visible(False)
    return body.figure


# ---- writing -----------------------------------------------------------------------------------

FIGURES: dict[str, Callable[[list[Group]], Figure]] = {
    "Time.png": time_figure, "Accuracy.png": accuracy_figure, "Curves.png": curves_figure,
    "Speedup.png": speedup_figure}


def save_figure(figure: Figure, path: Path, dpi: int) -> Path:
    return files.write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=dpi))


def write_text(path: Path, text: str) -> Path:
    return files.write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def say(message: str) -> None:
    """print, with what the terminal's encoding cannot show (an é under LANG=C) written as an escape."""
    encoding = sys.stdout.encoding or "utf-8"
    print(message.encode(encoding, "backslashreplace").decode(encoding))


def warn_to_stderr(message: str) -> None:
    print(f"{cli.script_name()}: warning: {message}", file=sys.stderr)


def make_all(results_dir: str | Path, output_dir: str | Path, dpi: int = 150,
             warn: Callable[[str], None] = warn_to_stderr, log: Callable[[str], None] = say) -> list[Path]:
    """Read every results JSON in `results_dir`; write the figures and summary.md to `output_dir`."""
    source = Path(results_dir)
    if not source.is_dir():
        raise UsageError(f"--results-dir {files.shown(results_dir)}: no such folder; point it at the folder the "
                         "training scripts wrote their results JSON files to")
    records, skipped = results.load_all(source)
    for message in skipped:
        warn(f"skipped {message}")
    if not records:
        raise UsageError(f"--results-dir {files.shown(results_dir)}: no valid results JSON files found "
                         f"({len(skipped)} skipped); run run_hpc.py or run_distributed.py first")
    target = results.check_output_folder(output_dir)
    groups = group_runs(records, warn)
    log(f"{cli.count(len(records), 'run')} in {cli.count(len(groups), 'group')} from {files.shown(source)}")
    written = [save_figure(draw(groups), target / name, dpi) for name, draw in FIGURES.items()]
    if any(group.profiled("step_ms") is not None for group in groups):
        written.append(save_figure(breakdown_figure(groups), target / "Breakdown.png", dpi))
    else:
        log("Breakdown.png not made: no run has a --profile breakdown")
    found = representative_samples(groups, source, warn)
    if found:
        written.append(save_figure(utilization_figure(found), target / "Utilization.png", dpi))
    else:
        log("Utilization.png not made: no run has monitor samples")
    written.append(write_text(target / "summary.md", summary_markdown(groups, source)))
    for path in written:
        log(f"wrote {files.shown(path)}")
    return written
