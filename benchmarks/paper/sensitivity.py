"""Experiment 1 (the paper's Figure 2): sensitivity to the initial learning rate.

Every method of ``--methods`` is trained from every η0 of ``--lrs`` with every seed of ``--seeds`` on the paper's
MNIST MLP (batch 128, weight decay 5e-4, BB's shallow-network taus 1/3..3: the training command's defaults).
Each run is saved as ``<out>/<name>.json``; runs already saved (here or by ``compare.py``) are not trained
again unless ``--retrain`` is given. ``report.py`` turns the files into tables and figures.

    python benchmarks/paper/sensitivity.py --jobs 2                  # 7 methods x 4 η0 x 2 seeds x 10 epochs
    python benchmarks/paper/sensitivity.py --methods bb-safe --jobs 2 # BB with --bb-safeguard on the same grid
    python benchmarks/paper/sensitivity.py --model lenet              # experiment 3's grid on LeNet-5
    python benchmarks/paper/sensitivity.py --quick                   # smoke test: 512 images, 2 epochs
    python benchmarks/paper/sensitivity.py --methods bb-safe --retrain  # BB's runs again, after a change to BB
    python benchmarks/paper/sensitivity.py --model resnet18 --device cuda -- --amp bf16 --channels-last

Options after ``--`` go to every run's ``bbfused-train`` command line (and into the run's name); a
torchvision model on MNIST sees the gray channel three times, ``-- --data PATH`` trains on a folder instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from runs import BASELINES, METHODS, RUNS, Run, parse_lrs, run_all

LRS = "1e-3,1e-2,1e-1,1"
QUICK_OPTIONS = ("--limit-train", "512", "--limit-test", "512")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--methods", default=",".join(("bb", *BASELINES)), help="comma-separated (default: %(default)s)"
    )
    parser.add_argument("--lrs", default=LRS, help="initial learning rates η0, comma-separated (default: %(default)s)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=10, help="(default: %(default)s)")
    parser.add_argument("--model", default="mlp", help="mlp, lenet or a torchvision model (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one thread each (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="folder of the run files (default: paper_runs/sensitivity[_quick])")
    parser.add_argument("--quick", action="store_true", help="smoke test: 512 train/test images, 2 epochs, 1 seed")
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train every run of the grid again, replacing saved ones here (runs saved by compare.py are not used)",
    )
    return parser


def grid(args: argparse.Namespace) -> list[Run]:
    """The runs of the sweep, seed by seed (so that partial results cover every method), BB first."""
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    options = (*(QUICK_OPTIONS if args.quick else ()), *args.train_options)
    seeds = [int(s) for s in args.seeds.split(",")]
    return [
        Run(method, lr, seed, args.epochs, args.model, options, args.device)
        for seed in seeds
        for method in methods
        for lr in parse_lrs(args.lrs)
    ]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The script's options; ``train_options`` are those after ``--``, for every run's training command."""
    parser = build_parser()
    args, train_options = parser.parse_known_args(argv)
    if train_options and train_options[0] != "--":
        parser.error(f"unrecognized arguments: {' '.join(train_options)} (options of the training command go after --)")
    train_options = train_options[1:]
    owned = ("--device", "--model", "--lr", "--seed", "--epochs", "--optimizer")
    if any(option.split("=")[0] in owned for option in train_options):
        raise SystemExit(f"give --device, --model, --seeds, --epochs, --lrs, --methods before '--': {train_options}")
    args.train_options = tuple(train_options)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.quick:
        args.epochs, args.seeds = 2, "0"
    out = args.out or RUNS / ("sensitivity_quick" if args.quick else "sensitivity")
    comparison = out.parent / out.name.replace("sensitivity", "comparison")
    run_all(grid(args), out, args.jobs, reuse=(comparison,), retrain=args.retrain)


if __name__ == "__main__":
    main()
