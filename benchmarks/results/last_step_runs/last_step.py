"""A prototype for the default rate control, not in the optimizer: a period rolled back on its last step's loss
alone (the mean loss, the weights and the live gradients passed every test) is treated as a rise rolled back: the rate
returns to the last good one under a ceiling of CEILING times the period's, and is not capped for good. The last-step
test (the last step's loss 2.5 times the best mean) looks for damage done in a period's last steps, but on a small
data set with a near-zero loss one hard batch passes it: the ResNet-18 stand-in of paper_mnist.md (η0 = 1, seed 0)
was rolled back at rate 0.05 in epoch 4, capped at 0.013 for good, and its training loss stayed at 0.12 for the last
six epochs. Runs are saved as the suite saves them, as method ``bb[last-step]``:

    python benchmarks/results/last_step_runs/last_step.py OUT_DIR SETTINGS SEEDS LRS
    python benchmarks/results/last_step_runs/last_step.py table   # beside the default, and the checks

Results: ../2026-12-05_cpu_last_step.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prototypes import prototype_main  # noqa: E402

from bbfused.control import safeguard  # noqa: E402

diverged_as_shipped = safeguard.SafeguardControl.diverged


def diverged(self, sums, clock, live=None):
    """The shipped tests; then again with the last step's loss replaced by the mean: a period that passes then was
    rolled back by the last step alone, and counts as risen (no cap for good)."""
    rolled_back, risen, rose, near_start, references = diverged_as_shipped(self, sums, clock, live)
    epoch_loss = self._epoch_loss

    def mean_as_last(steps):
        mean, complete, initial, *_ = epoch_loss(steps)
        return mean, complete, initial, mean, mean

    self._epoch_loss = mean_as_last
    try:
        without_last = diverged_as_shipped(self, sums, clock, live)[0]
    finally:
        del self._epoch_loss
    last_only = rolled_back & ~without_last
    return rolled_back, risen | last_only, rose, near_start, references


def install() -> None:
    """Patch the prototype into BB's default control (the decision as torch ops: the Triton kernel is turned off)."""
    safeguard.SafeguardControl.diverged = diverged
    safeguard.SafeguardControl._decision_kernels = lambda self, buffers: None


METHOD = "bb[last-step]"

if __name__ == "__main__":
    prototype_main(sys.argv, METHOD, Path(__file__).resolve().parent / "runs", install)
