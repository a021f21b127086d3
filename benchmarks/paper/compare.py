"""Experiment 2 (the paper's Figure 3): every baseline at its tuned η0 against BB at η0 = 0.1.

Tuning: every baseline is trained from each η0 of the half-decade grid 10^0, 10^-0.5, ..., 10^-6 for
``--tune-epochs`` epochs on ``--tune-limit-train`` training images (0: all), one seed; its best η0 is the one
with the highest test accuracy at the end (the lower training loss breaks ties). Then every baseline at its
best η0, and BB (and BB with its safeguard) at η0 = 0.1, train ``--epochs`` epochs on all of MNIST. Runs
already made with the same method, η0, seed, epochs and data (by experiment 1, or as tuning runs of the full
protocol) are reused, not trained again.

    python benchmarks/paper/compare.py --jobs 2                          # short tuning (2 epochs, 10,000 images)
    python benchmarks/paper/compare.py --tune-epochs 10 --tune-limit-train 0 --jobs 2   # the paper's: full runs
    python benchmarks/paper/compare.py --model lenet --jobs 2            # LeNet-5, tuned on LeNet-5
    python benchmarks/paper/compare.py --quick                           # smoke test
    python benchmarks/paper/compare.py --retrain --jobs 2                # BB's runs again, after a change to BB
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from runs import BASELINES, RUNS, Run, run_all

TUNING_GRID = [round(10 ** (-half / 2), 10) for half in range(13)]  # 1, 0.316, 0.1, ..., 1e-6


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp", choices=("mlp", "lenet"), help="(default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the compared runs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--tune-epochs", type=int, default=2, help="epochs of a tuning run (default: %(default)s)")
    parser.add_argument(
        "--tune-limit-train",
        type=int,
        default=10000,
        help="training images of a tuning run; 0: all of them (default: %(default)s)",
    )
    parser.add_argument("--lrs-from", choices=("mlp", "lenet"), help="skip tuning: use the best η0 tuned on this model")
    parser.add_argument(
        "--baselines", default=",".join(BASELINES), help="methods tuned and compared (default: %(default)s)"
    )
    parser.add_argument("--bb-methods", default="bb,bb-safe", help="BB variants at η0 0.1 (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one thread each (default: %(default)s)")
    parser.add_argument("--runs", type=Path, default=RUNS, help="folder of the run folders (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 512 images, 1 epoch, a 3-point grid")
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train BB's compared runs again, replacing saved ones (after a change to BB); baselines are kept",
    )
    return parser


def best_lrs(tuning: list[dict]) -> dict[str, float]:
    """{method: η0 of the highest final test accuracy, ties to the lower final training loss}."""
    best: dict[str, tuple[float, float, float]] = {}
    for record in tuning:
        last = record["history"][-1]
        loss = last["train_loss"] if last["train_loss"] == last["train_loss"] else float("inf")
        key = (last["test_acc1"], -loss, record["run"]["lr"])
        method = record["run"]["method"]
        if method not in best or key > best[method]:
            best[method] = key
    return {method: key[2] for method, key in best.items()}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    suffix = "_quick" if args.quick else ""
    grid = TUNING_GRID
    limit: tuple[str, ...] = ("--limit-train", str(args.tune_limit_train)) if args.tune_limit_train else ()
    final_options: tuple[str, ...] = ()
    if args.quick:
        grid, args.epochs, args.tune_epochs = [1.0, 1e-2, 1e-4], 1, 1
        limit = ("--limit-train", "512", "--limit-test", "512")
        final_options = limit
    source = args.lrs_from or args.model
    baselines = [m for m in args.baselines.split(",") if m]
    unknown = [m for m in baselines if m not in BASELINES]
    if unknown:
        raise SystemExit(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
    tuning_runs = [Run(m, lr, args.seed, args.tune_epochs, source, limit) for m in baselines for lr in grid]
    # A tuning run on all images for as many epochs as an experiment-1 run is that run: reused, not trained again.
    sensitivity = (args.runs / f"sensitivity{suffix}",)
    tuning = run_all(tuning_runs, args.runs / f"tuning{suffix}", 1 if args.lrs_from else args.jobs, reuse=sensitivity)
    lrs = best_lrs(tuning)
    print("best η0:", json.dumps(lrs))
    bb_methods = [m for m in args.bb_methods.split(",") if m]
    final = [Run(m, lrs[m], args.seed, args.epochs, args.model, final_options) for m in baselines]
    bb_final = [Run(m, 0.1, args.seed, args.epochs, args.model, final_options) for m in bb_methods]
    comparison, reuse = args.runs / f"comparison{suffix}", (*sensitivity, args.runs / f"tuning{suffix}")
    run_all(final, comparison, args.jobs, reuse=reuse)
    run_all(bb_final, comparison, args.jobs, reuse=reuse, retrain=args.retrain)


if __name__ == "__main__":
    main()
