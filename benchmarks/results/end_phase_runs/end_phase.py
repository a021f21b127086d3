"""Prototypes for the default rate control's end phase, not in the optimizer. Each run is saved as the suite saves
it, as method ``bb[anneal-MODE]``:

    python benchmarks/results/end_phase_runs/end_phase.py OUT_DIR SETTINGS SEEDS LRS MODE [adam]

With ``adam`` the runs are of ``BB(..., preconditioner="adam")``, saved as ``bb[anneal-MODE-adam]``.

- MODE a number F: each end-phase epoch at the cosine's value at its end, the cosine starting at F times the planned
  epochs (0: it falls over the whole run, as the tuned reference's cosine annealing does). F = 0.5 is the end phase
  that BB's default's midpoint end phase was measured against: its factors end at 0.25 in a run of 3 or 4 epochs,
  0.07 in one of 10.
- MODE ``midpoint``: the end phase BB's default applies (half the run, each epoch at the cosine's value at its
  middle, ending at 0.15 and 0.02): ``safeguard.anneal_factor`` itself, so the prototype's runs can be trained
  again.
- MODE ``hold``: once a period ran at an end-phase factor below 1, BB's estimate no longer moves r; only the loss
  brake and the rollbacks do. In the end phase the estimate is mostly noise, which scales with the applied step,
  so following it compounds the cosine. The decision runs as
  torch ops (the Triton decision kernel is turned off).

Results: ../2026-12-05_cpu_end_phase.md.
"""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prototypes import train_runs  # noqa: E402

from bbfused.control import safeguard  # noqa: E402

FRACTION = 0.5
next_rate_as_shipped = safeguard.SafeguardControl.next_rate
close_epoch_as_shipped = safeguard.SafeguardControl.close_epoch
anneal_factor_as_shipped = safeguard.anneal_factor


def close_epoch(self, buffers, base, clock, taus):
    """The shipped close_epoch, noting first whether the closing period ran at an end-phase factor below 1."""
    self.prototype_end_phase = safeguard.anneal_factor(clock.epoch, self.epochs) < 1
    return close_epoch_as_shipped(self, buffers, base, clock, taus)


def next_rate(self, sums, diverged, rose, steps, bounds, search_open=True, risen=None):
    """The shipped next_rate, then in the end phase r kept (halved when the loss rose) instead of following η."""
    new_rate, searching, ceiling = next_rate_as_shipped(self, sums, diverged, rose, steps, bounds, search_open, risen)
    if getattr(self, "prototype_end_phase", False):
        held = torch.where(rose, self.rate * safeguard.LOSS_BRAKE, self.rate)
        held = torch.minimum(held.clamp(min=bounds[0], max=bounds[1]), self.lr_cap)
        new_rate = torch.where(diverged, new_rate, held)
    return new_rate, searching, ceiling


def end_phase(cosine):
    """A replacement for safeguard.anneal_factor whose host factor for epoch k (of the run's planned ``epochs``,
    k clamped to the last) is ``cosine(k, epochs)``; a device-counted epoch indexes the host's table, as shipped."""

    def factor(epoch, epochs, table=None):
        if epochs is None:
            return 1.0
        if isinstance(epoch, torch.Tensor):
            table = safeguard.anneal_table(epochs, epoch.device) if table is None else table
            return table[epoch.to(table.device).clamp(min=0, max=epochs - 1)]
        return cosine(min(epoch, epochs - 1), epochs)

    return factor


def _late_start(k, epochs):
    """Each end-phase epoch at the cosine's value at its end, the cosine starting at FRACTION of the run."""
    start = int(epochs * FRACTION)
    if k < start:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (k - start + 1) / (epochs - start + 1)))


anneal_factor = end_phase(_late_start)


def install(mode: str) -> None:
    """Patch the shipped control with the end phase of ``mode`` (see the module docstring)."""
    global FRACTION
    if mode == "hold":
        safeguard.SafeguardControl.close_epoch = close_epoch
        safeguard.SafeguardControl.next_rate = next_rate
        safeguard.SafeguardControl._decision_kernels = lambda self, buffers: None
    elif mode == "midpoint":
        safeguard.anneal_factor = anneal_factor_as_shipped
    else:
        FRACTION = float(mode)
        safeguard.anneal_factor = anneal_factor


def main(argv: list[str]) -> None:
    """OUT_DIR SETTINGS SEEDS LRS MODE [adam]: runs saved as bb[anneal-MODE] (bb[anneal-MODE-adam])."""
    adam = len(argv) > 5 and argv[5] == "adam"
    kwargs = {"preconditioner": "adam"} if adam else None
    install(argv[4])
    train_runs(*argv[:4], f"bb[anneal-{argv[4]}{'-adam' if adam else ''}]", kwargs)


if __name__ == "__main__":
    main(sys.argv[1:])
