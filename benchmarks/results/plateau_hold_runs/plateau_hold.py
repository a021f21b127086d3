"""Prototype for the default rate control, not in the optimizer: while a period's mean loss is still above the
search's progress mark (0.95 times the first step's loss) and did not rise, BB's estimate may not lower r. On an
initial plateau the estimate measures gradient noise, not curvature, and following it down leaves the plateau
later or never. Runs are saved as method ``bb[plateau-hold]``:

    python benchmarks/results/plateau_hold_runs/plateau_hold.py OUT_DIR SETTINGS SEEDS LRS
    python benchmarks/results/plateau_hold_runs/plateau_hold.py table
    python benchmarks/results/plateau_hold_runs/plateau_hold.py moves

``moves``: the runs moved by a point or more against BB's default, with both rate histories.

The decision runs as torch ops (the Triton decision kernel is turned off).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prototypes import load, paired_runs, print_moves, prototype_main, score  # noqa: E402

from bbfused.control import safeguard  # noqa: E402

METHOD = "bb[plateau-hold]"
diverged_as_shipped = safeguard.SafeguardControl.diverged
next_rate_as_shipped = safeguard.SafeguardControl.next_rate


def diverged(self, sums, clock, live=None):
    """The shipped test, noting whether the period's mean loss is still near the first step's."""
    result = diverged_as_shipped(self, sums, clock, live)
    self.prototype_near_start = result[3]
    return result


def next_rate(self, sums, diverged, rose, steps, bounds, search_open=True, risen=None):
    """The shipped next_rate; near the start, a good period whose loss did not rise keeps at least r."""
    new_rate, searching, ceiling = next_rate_as_shipped(self, sums, diverged, rose, steps, bounds, search_open, risen)
    near_start = getattr(self, "prototype_near_start", None)
    if near_start is not None:
        hold = near_start & ~rose & ~diverged
        new_rate = torch.where(hold, torch.maximum(new_rate, torch.minimum(self.rate, self.lr_cap)), new_rate)
    return new_rate, searching, ceiling


def install() -> None:
    safeguard.SafeguardControl.diverged = diverged
    safeguard.SafeguardControl.next_rate = next_rate
    safeguard.SafeguardControl._decision_kernels = lambda self, buffers: None


def print_moved_runs(folder: Path) -> None:
    """The prototype's runs in ``folder`` that moved a point or more from BB's default's, with both rates."""
    _, runs = load([folder])
    print_moves(runs, [METHOD])
    print()
    print("| setting | η0 | seed | bb → prototype (%) | bb's rates | the prototype's rates |")
    print("|---|---|---|---|---|---|")
    for (setting, lr, seed), record, baseline in paired_runs(runs, METHOD, "bb"):
        if abs(score(record) - score(baseline)) < 1:
            continue
        rates = [", ".join(f"{r:.3g}" for r in run["bb_lr_history"]) for run in (baseline, record)]
        moved = f"{score(baseline):.1f} → {score(record):.1f}"
        print(f"| {setting} | {lr:g} | {seed} | {moved} | {rates[0]} | {rates[1]} |")


if __name__ == "__main__":
    folder = Path(__file__).resolve().parent / "runs"
    if sys.argv[1:2] == ["moves"]:
        print_moved_runs(folder)
    else:
        prototype_main(sys.argv, METHOD, folder, install)
