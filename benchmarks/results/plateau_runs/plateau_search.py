"""A prototype for the default rate control, not in the optimizer: while a period's mean loss is still near the first
step's (above 0.95 times it, the search's progress mark), an estimate below the rate does not end the search. On a
plateau the estimate is noise that shrinks with the step taken (deep ReLU nets without normalisation from a small
η0: each epoch's estimate about 0.3 times the rate that produced it, down to the 1e-4 floor), and the search's
growth is what leaves it; a rate that grows into a kill is rolled back by the dead-unit test, a rise by the rise test.

With ``hold`` the search ends as the default's does, and near the first step's loss (without a rise) a falling
estimate does not lower the rate instead. The decision runs as torch ops (the Triton decision kernel is turned off).
Each run is saved as the suite saves it, as method ``bb[plateau]`` (``bb[plateau-hold]``):

    python benchmarks/results/plateau_runs/plateau_search.py OUT_DIR SETTINGS 0,1 0.001,0.01,0.1,1,10 [hold]

Results: ../2026-12-05_cpu_plateau_search.md. Its runs were trained at commit 290a0b8, before the dead-unit test
kept a second collapse in a row (47a713f); run later, the prototype sits on that rule and some runs differ.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prototypes import train_runs  # noqa: E402

from bbfused.control.safeguard import (  # noqa: E402
    BACKOFF,
    CAP,
    CEILING,
    LOSS_BRAKE,
    RATE_SHRINK_LIMIT,
    SafeguardControl,
)
from bbfused.rule import bb_ratio  # noqa: E402

diverged_as_shipped = SafeguardControl.diverged


def diverged(self, sums, clock, live=None):
    decision = diverged_as_shipped(self, sums, clock, live)
    self.plateau_near_start = decision[3]
    return decision


def next_rate(self, sums, diverged, rose, steps, bounds, search_open=True, risen=None):
    """SafeguardControl.next_rate with one change, marked below."""
    risen = torch.zeros_like(diverged) if risen is None else risen
    lowest, highest = bounds
    r = self.rate
    estimate = bb_ratio(sums, steps)
    usable = torch.isfinite(estimate) & (estimate > 0) & self.has_snapshot
    # The change (MODE "search"): near the first step's loss an estimate below the rate does not end the search.
    plateau = self.plateau_near_start if MODE == "search" else torch.zeros_like(diverged)
    objection = usable & (estimate < r) & ~plateau
    searching = self.searching & ~rose & ~objection & ~diverged
    searching = searching & torch.as_tensor(search_open, device=r.device)
    search = torch.maximum(r * self.SEARCH_GROWTH, torch.minimum(estimate, r * self.SEARCH_LIMIT))
    growth = torch.where(rose, torch.full_like(r, LOSS_BRAKE), torch.full_like(r, self.RATE_GROWTH_LIMIT))
    follow = torch.minimum(torch.maximum(estimate, r * RATE_SHRINK_LIMIT), r * growth)
    kept = torch.where(usable, torch.where(searching, search, follow), torch.minimum(r, r * growth))
    if MODE == "hold":  # the change: near the first step's loss a falling estimate does not lower the rate
        kept = torch.where(self.plateau_near_start & ~rose, torch.maximum(kept, r), kept)
    ceiling = torch.where(rose | risen, torch.minimum(self.ceiling, r * CEILING), self.ceiling)
    kept = torch.minimum(kept, torch.where(rose, ceiling, torch.maximum(ceiling, r)))
    kept = torch.minimum(kept.clamp(min=lowest, max=highest), self.lr_cap)
    backed_off = torch.where(torch.isnan(self.good_lr), r * BACKOFF, torch.minimum(self.good_lr, r * CAP))
    rise_rate = torch.minimum(torch.where(torch.isnan(self.good_lr), r * LOSS_BRAKE, self.good_lr), ceiling)
    backed_off = torch.where(risen, rise_rate, backed_off)
    return torch.where(diverged, backed_off.clamp(max=highest), kept), searching, ceiling


MODE = "search"


def install(mode: str = "search") -> None:
    global MODE
    MODE = mode
    SafeguardControl.diverged = diverged
    SafeguardControl.next_rate = next_rate
    SafeguardControl._decision_kernels = lambda self, buffers: None


def main(argv: list[str]) -> None:
    """OUT_DIR SETTINGS SEEDS LRS [hold]: runs saved as bb[plateau] (or bb[plateau-hold], the rate held instead)."""
    install(argv[4] if len(argv) > 4 else "search")
    train_runs(*argv[:4], "bb[plateau]" if MODE == "search" else f"bb[plateau-{MODE}]")


if __name__ == "__main__":
    main(sys.argv[1:])
