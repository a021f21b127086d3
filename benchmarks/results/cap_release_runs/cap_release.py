"""A prototype for the default rate control, not in the optimizer: the cap a rollback sets (CAP times the rate that
diverged) is lifted once the best mean loss has fallen below RELEASE times its value when the cap was set. A rate
that damaged the network on a plateau is often fine after it (a residual CNN without normalisation lost 73 % of its
live gradient values at rate 1.12 in epoch 2, then trained at the cap, 0.28, with its loss still falling fast when
the run ended); the cap alone made the rest of such a run constant-rate SGD. On release the rate may grow again as
the rule allows, but not past CEILING times the rate that diverged (the ceiling a rise sets). Runs are saved as the
suite saves them, as method ``bb[cap-release]``:

    python benchmarks/results/cap_release_runs/cap_release.py OUT_DIR SETTINGS SEEDS LRS
    python benchmarks/results/cap_release_runs/cap_release.py table   # beside the default, and the checks

RELEASE was chosen before any run. Results: ../2026-12-05_cpu_cap_release.md.
"""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prototypes import prototype_main  # noqa: E402

from bbfused.control import safeguard  # noqa: E402

RELEASE = 0.75
close_epoch_as_shipped = safeguard.SafeguardControl.close_epoch


def close_epoch(self, buffers, base, clock, taus):
    """The shipped period end, then the cap set or lifted (host reads: the prototype runs on a host clock)."""
    cap_before = float(self.lr_cap)
    reference = float(self.best_loss) if not math.isnan(float(self.best_loss)) else float(self.initial_loss)
    applied, diverged = close_epoch_as_shipped(self, buffers, base, clock, taus)
    cap = float(self.lr_cap)
    if cap < cap_before:
        self.cap_loss = reference
    elif math.isfinite(cap) and not bool(diverged) and float(self.best_loss) < RELEASE * getattr(self, "cap_loss", 0):
        ceiling = torch.full_like(self.ceiling, safeguard.CEILING * cap / safeguard.CAP)
        self.ceiling.copy_(torch.minimum(self.ceiling, ceiling))
        self.lr_cap.fill_(math.inf)
    return applied, diverged


def install() -> None:
    """Patch the prototype into BB's default control (the decision as torch ops: the Triton kernel is turned off)."""
    safeguard.SafeguardControl.close_epoch = close_epoch
    safeguard.SafeguardControl._decision_kernels = lambda self, buffers: None


METHOD = "bb[cap-release]"

if __name__ == "__main__":
    prototype_main(sys.argv, METHOD, Path(__file__).resolve().parent / "runs", install)
