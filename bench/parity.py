#!/usr/bin/env python3
"""Accuracy parity: the suite's fast defaults against the classic reference setup, over several seeds.

    python bench/parity.py --device cpu --subset 5000 --epochs 10 --json p.json   # a short CPU comparison
    python bench/parity.py --device cuda --json p.json    # ResNet18, full CIFAR-10, 20 epochs, seeds 0,1,2

Both setups train with run_hpc.py's code on the same data with the same seeds, alternating seed by seed. Every
run's results JSON is kept under <output-dir>/fast/ and <output-dir>/reference/ (plot_hpml.py reads them).
Reported per setup: final and best test accuracy of every seed, their mean and standard deviation; then the
difference of the means with its standard error, and whether it is within two standard errors (run-to-run noise).
With --resume, runs already finished under --output-dir with the same settings are read back, not trained again,
so that an interrupted comparison, or one split over several sessions (say one seed each), carries on.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hpml.errors import UsageError, one_line_on_ctrl_c  # noqa: E402

one_line_on_ctrl_c()  # before torch loads

from hpml import cli, files, results  # noqa: E402
from hpml.config import MAX_SEED, TrainConfig, default_data_dir, parse_model_list  # noqa: E402
from hpml.training import dist, loop, speed  # noqa: E402

SETUPS = {"fast": {}, "reference": speed.REFERENCE_SETUP}
# The training flags a comparison takes; the speed flags are the setups', and the rest keep the study's values.
TRAINING_FLAGS = ("--model", "--epochs", "--batch-size", "--drop-last", "--data-dir", "--dataset", "--subset",
                  "--device")
RUN_FIELDS = ("final_test_acc", "best_test_acc", "total_train_time_s", "median_images_per_s")
# The TrainConfig fields --resume does not match finished runs on: where the files are, what a run shows, and the
# device as asked for (the device the run used is matched instead). Every other field must be equal.
UNMATCHED_FIELDS = ("models", "output_dir", "checkpoint_dir", "data_dir", "quiet", "resume", "utilization",
                    "sample_interval", "device")


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[int], TrainConfig]:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_training_args(parser, only=TRAINING_FLAGS)
    comparison = parser.add_argument_group("comparison")
    comparison.add_argument("--seeds", default="0,1,2",
                            help="comma list of seeds; each trains once in each setup (default: %(default)s)")
    comparison.add_argument("--output-dir", type=cli.path_flag, default=Path("parity"),
                            help="folder for the runs' results, one sub-folder per setup (default: %(default)s)")
    comparison.add_argument("--resume", action="store_true",
                            help="read back the runs already finished under --output-dir with the same model, seed, "
                                 "setup and settings (not the code version) instead of training them again "
                                 "(default: train every run)")
    comparison.add_argument("--json", type=cli.path_flag, default=None,
                            help="write the comparison to this JSON file (default: not written)")
    args = parser.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    base = TrainConfig(models=parse_model_list(args.model), epochs=args.epochs, batch_size=args.batch_size,
                       drop_last=args.drop_last, subset=args.subset, dataset=args.dataset,
                       data_dir=str(args.data_dir or default_data_dir()), device=args.device).validate()
    for setup in SETUPS:
        results.check_output_folder(args.output_dir / setup)
    if args.json:
        files.check_output_file(args.json, "--json")
    return args, seeds, base


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UsageError(f"--seeds must be a comma list of distinct integers, 0 or more, e.g. 0,1,2; got {text!r}")
    if max(seeds) > MAX_SEED:
        raise UsageError(f"--seeds must be at most {MAX_SEED} each, got {text!r}")
    return seeds


def run_all(args: argparse.Namespace, seeds: list[int], base: TrainConfig,
            world: dist.World) -> dict[str, dict[str, list[dict]]]:
    """Train every (seed, setup) pair; per model and setup, one entry per seed with the run's headline figures."""
    runs: dict[str, dict[str, list[dict]]] = {name: {setup: [] for setup in SETUPS} for name in base.models}
    with tempfile.TemporaryDirectory(prefix="hpml-parity-") as checkpoints:
        for number, (seed, setup) in enumerate([(seed, setup) for seed in seeds for setup in SETUPS], start=1):
            cfg = dataclasses.replace(base, seed=seed, output_dir=str(args.output_dir / setup),
                                      checkpoint_dir=f"{checkpoints}/{setup}_seed{seed}", **SETUPS[setup])
            found = finished_runs(cfg, world) if args.resume else {}
            label = f"run {number} of {len(seeds) * len(SETUPS)}: {setup} setup, seed {seed}"
            print(label + "".join(f"; {name} read back from {path}" for name, path in found.items()), flush=True)
            paths = list(found.values())
            missing = [name for name in cfg.models if name not in found]
            if missing:
                paths += loop.run_models(dataclasses.replace(cfg, models=missing).validate(), world)
            for path in paths:
                record = results.load_results(path)
                runs[record["model"]][setup].append({"seed": seed, **{key: record[key] for key in RUN_FIELDS},
                                                     "speed": record["speed"], "results_file": str(path)})
    return runs


def finished_runs(cfg: TrainConfig, world: dist.World) -> dict[str, Path]:
    """Per model of cfg, the newest results file under cfg.output_dir of a run with cfg's settings on this device."""
    wanted = {key: value for key, value in cfg.as_dict().items() if key not in UNMATCHED_FIELDS}
    records, _ = results.load_all(cfg.output_dir)
    return {record["model"]: Path(cfg.output_dir) / f"{record['run_id']}.json" for record in records
            if record["model"] in cfg.models and record["device"] == world.device.type
            and {key: record["config"].get(key) for key in wanted} == wanted}


def compare(setups: dict[str, list[dict]]) -> dict:
    """Mean and standard deviation per setup, and the fast-minus-reference difference of the mean accuracies."""
    summary: dict = {}
    for setup, runs in setups.items():
        for key in RUN_FIELDS:
            values = [run[key] for run in runs]
            summary.setdefault(setup, {})[key] = {"mean": statistics.mean(values),
                                                  "std": statistics.stdev(values) if len(values) > 1 else None}
    for key in ("final_test_acc", "best_test_acc"):
        fast, reference = summary["fast"][key], summary["reference"][key]
        difference = fast["mean"] - reference["mean"]
        error = (math.sqrt(fast["std"] ** 2 / len(setups["fast"]) + reference["std"] ** 2 / len(setups["reference"]))
                 if fast["std"] is not None else None)
        summary[f"{key}_difference"] = {"fast_minus_reference": difference, "standard_error": error,
                                        "within_two_standard_errors": None if error is None
                                        else abs(difference) <= 2 * error}
    summary["train_time_ratio"] = (summary["reference"]["total_train_time_s"]["mean"]
                                   / summary["fast"]["total_train_time_s"]["mean"])
    return summary


def print_model(name: str, setups: dict[str, list[dict]], summary: dict) -> None:
    print(f"\n{name:<12}{'seed':>6}{'final acc':>11}{'best acc':>10}{'train s':>10}{'img/s':>9}")
    for setup, runs in setups.items():
        for run in runs:
            print(f"  {setup:<10}{run['seed']:>6}{run['final_test_acc']:>11.4f}{run['best_test_acc']:>10.4f}"
                  f"{run['total_train_time_s']:>10.1f}{run['median_images_per_s']:>9.0f}")
        figures = summary[setup]
        spread = "" if figures["final_test_acc"]["std"] is None else \
            f" (std {figures['final_test_acc']['std']:.4f} final, {figures['best_test_acc']['std']:.4f} best)"
        print(f"  {setup:<10}{'mean':>6}{figures['final_test_acc']['mean']:>11.4f}"
              f"{figures['best_test_acc']['mean']:>10.4f}{figures['total_train_time_s']['mean']:>10.1f}"
              f"{figures['median_images_per_s']['mean']:>9.0f}{spread}")
    for key, label in (("final_test_acc", "final"), ("best_test_acc", "best")):
        difference = summary[f"{key}_difference"]
        line = f"  fast - reference, {label} accuracy: {100 * difference['fast_minus_reference']:+.2f} points"
        if difference["standard_error"] is not None:
            verdict = "within" if difference["within_two_standard_errors"] else "NOT within"
            line += (f" (standard error {100 * difference['standard_error']:.2f}; {verdict} two standard "
                     "errors)")
        print(line)
    print(f"  training time, reference / fast: {summary['train_time_ratio']:.2f}x")


def main(argv: Sequence[str] | None = None) -> int:
    args, seeds, base = parse_args(argv)
    world = dist.single_process(base.device)
    for changes in SETUPS.values():  # refuse what this device cannot run before the first run starts
        speed.resolve(dataclasses.replace(base, **changes), world.device)
    runs = run_all(args, seeds, base, world)
    report = {"device": results.environment(world.device), "epochs": base.epochs, "batch_size": base.batch_size,
              "drop_last": base.drop_last, "dataset": base.dataset, "subset": base.subset, "seeds": seeds,
              "models": {}}
    for name, setups in runs.items():
        summary = compare(setups)
        report["models"][name] = {"runs": setups, "summary": summary}
        print_model(name, setups, summary)
    if args.json:
        results.write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    cli.run_script(main)
