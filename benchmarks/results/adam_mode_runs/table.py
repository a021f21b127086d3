"""The tables of 2026-12-07_cpu_adam_mode_bound.md: ``BB(preconditioner="adam")`` (the suite's method ``bb[adam]``,
recorded in ``robustness_runs/``) against the best tuned reference of every setting, per seed; the issue's first two
checks for it beside each reference tuned per setting with hindsight; then its runs on the paper's ResNet-18 stand-in
(``resnet18/``): ``python benchmarks/results/adam_mode_runs/table.py``.

In this mode every η0 ≥ 1e-3 is the same run, so the per-seed table shows each seed's η0 = 1e-3 run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1] / "robustness"))

from prototypes import adam_seeds  # noqa: E402
from report import best_reference, load_runs, method_order, tuned_bound_section  # noqa: E402
from suite import LRS, RUNS, SEEDS, SETTINGS  # noqa: E402

MODE = "bb[adam]"


def main() -> None:
    runs = load_runs(RUNS)
    adam_seeds(runs, runs, [MODE], SEEDS)
    print()
    settings = list(SETTINGS)
    best = {setting: best_reference(runs, setting, LRS, SEEDS) for setting in settings}
    shown = method_order({key[1] for key in runs})
    print("\n".join(tuned_bound_section(runs, settings, best, shown, LRS, SEEDS)))
    print("| ResNet-18 stand-in, seed | final test top-1 % | final training loss | rate per epoch | rolled back |")
    print("|---|---|---|---|---|")
    for path in sorted((HERE / "resnet18").glob("*.json")):
        record = json.loads(path.read_text())
        history = record["history"]
        rates = ", ".join(f"{epoch['lr']:.2g}" for epoch in history)
        rolled_back = sum(bool(epoch.get("rolled_back")) for epoch in history)
        print(
            f"| {record['run']['seed']} | {history[-1]['test_acc1']:.2f} | {history[-1]['train_loss']:.4f} | {rates} "
            f"| {rolled_back or 'none'} |"
        )


if __name__ == "__main__":
    main()
