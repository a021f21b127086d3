"""The tables of 2026-12-06_cpu_beta_control.md: BB's default with its own gradient average at the factor a momentum
buffer of μ = 0.9 has (``BB(beta=0.1)``, run files in ``runs/``), beside the default and the shared-buffer prototype
(``../shared_ema_runs/runs/``): ``python benchmarks/results/beta_control_runs/table.py``. The runs were trained with

    python benchmarks/robustness/suite.py --methods bb --variant beta0.1 --bb-kwargs '{"beta": 0.1}' \\
        --settings all --seeds 0,1 --jobs 2 --retrain --out benchmarks/results/beta_control_runs/runs
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1] / "robustness"))

from prototypes import load, side_by_side  # noqa: E402
from report import best_reference, gap_stats, gaps  # noqa: E402
from suite import LRS, SEEDS, SETTINGS  # noqa: E402

METHODS = ["bb", "bb[beta0.1]", "bb[shared-ema]"]


def by_epoch_length(references: dict, runs: dict) -> None:
    """Runs more than 3 points short per method, for settings grouped by steps an epoch (the default's β = 4/T)."""
    groups = {"T ≤ 24": (0, 24), "25 ≤ T ≤ 64": (25, 64), "T > 64": (65, 10**9)}
    steps = {setting: record["steps_per_epoch"] for (setting, method, _, _), record in runs.items() if method == "bb"}
    print("| steps an epoch | settings | " + " | ".join(METHODS) + " |")
    print("|---|---|" + "---|" * len(METHODS))
    for label, (low, high) in groups.items():
        chosen = [s for s in SETTINGS if s in steps and low <= steps[s] <= high]
        counts = []
        for method in METHODS:
            short = 0
            for setting in chosen:
                best = best_reference(references, setting, LRS, SEEDS)
                short += gap_stats(gaps(runs, setting, method, LRS, SEEDS, best.mean).values()).short
            counts.append(str(short))
        print(f"| {label} | {len(chosen)} | " + " | ".join(counts) + " |")


def main() -> None:
    references, runs = load([HERE / "runs", HERE.parent / "shared_ema_runs" / "runs"])
    side_by_side(references, runs, METHODS)
    print()
    by_epoch_length(references, runs)


if __name__ == "__main__":
    main()
