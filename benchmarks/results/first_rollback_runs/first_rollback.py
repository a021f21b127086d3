"""A prototype for the default rate control, not in the optimizer: within the split first epoch, a period whose mean
loss rose past the first epoch's tolerance (10 %) is rolled back, as a rise past 1.25x is after it, instead of only
braking the rate. A search step that overshoots can leave the weights where moderate rates no longer train (a
GroupNorm CNN sat at chance for five epochs after one 11-step period at 10 times the previous rate); the period is a
quarter of an epoch, so undoing it is cheap. Runs are saved as the suite saves them, as method
``bb[first-rollback]``:

    python benchmarks/results/first_rollback_runs/first_rollback.py OUT_DIR SETTINGS SEEDS LRS
    python benchmarks/results/first_rollback_runs/first_rollback.py table   # beside the default, and the checks

Results: ../2026-12-05_cpu_first_rollback.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prototypes import load, side_by_side, train_runs  # noqa: E402

from bbfused.control import safeguard  # noqa: E402

diverged_as_shipped = safeguard.SafeguardControl.diverged
FIRST_EPOCH_ROLLBACK = 1 + safeguard.FIRST_EPOCH_RISE


def diverged(self, sums, clock, live=None):
    """The shipped test with the rise rollback's factor at the first epoch's tolerance within its periods."""
    shipped = safeguard.RISE_ROLLBACK
    if clock.in_first_epoch_periods:
        safeguard.RISE_ROLLBACK = FIRST_EPOCH_ROLLBACK
    try:
        return diverged_as_shipped(self, sums, clock, live)
    finally:
        safeguard.RISE_ROLLBACK = shipped


def install() -> None:
    """Patch the prototype into BB's default control (the decision as torch ops: the Triton kernel is turned off)."""
    safeguard.SafeguardControl.diverged = diverged
    safeguard.SafeguardControl._decision_kernels = lambda self, buffers: None


METHOD = "bb[first-rollback]"

if __name__ == "__main__":
    if sys.argv[1:2] == ["table"]:
        side_by_side(*load([Path(__file__).resolve().parent / "runs"]), ["bb", METHOD])
    else:
        install()
        train_runs(*sys.argv[1:5], METHOD)
