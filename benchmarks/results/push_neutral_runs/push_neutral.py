"""A prototype for BB's default, not in the optimizer: the rule's Δθᵀy with the window's noise share set to a long
epoch's, so that on pure noise the estimate keeps the rate at every epoch length (a push of 1).

On noise of variance σ² = E‖d − E d‖² a step, the window's mean gives E Δθᵀy = −η·σ²·F_T with
F_T = 1 − q·(2 − μ^T), q = μ·(1 − μ^n) / ((1 − μ)·n), and E‖Δθ‖² = η²·σ²·T·S_T, S_T the mean squared weight a
direction has in the epochs' Δθ (``window_prior_runs/noise_push.py``: ``noise_shares``, ``analytic_push`` =
S_T / |F_T|). A long epoch
has F_T = S_T = 1. The prototype adds η·σ̂²·(F_T − S_T) to the measured Δθᵀy at each epoch end after the first, σ̂²
the sample variance of the window's n directions, (Σ‖d_i‖² − n·‖g‖²) / (n − 1), with Σ‖d_i‖² summed in float64 by
torch ops around the shipped step (the optimizer would need one more reduction during the window, no more bytes).
The correction is derived from the weights alone, not fitted to any run. ``--off`` computes it without applying it
(the shipped default, to check the patch changes nothing else).

    python benchmarks/results/push_neutral_runs/push_neutral.py OUT_DIR SETTINGS SEEDS LRS [--off]
    python benchmarks/results/push_neutral_runs/push_neutral.py outside SEEDS [SETTINGS] [--off]
    python benchmarks/results/push_neutral_runs/push_neutral.py table
    python benchmarks/results/push_neutral_runs/push_neutral.py outside-table
    python benchmarks/results/push_neutral_runs/push_neutral.py rates  # its rates against the default's
"""

import functools
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "window_prior_runs"))
from noise_push import noise_shares  # noqa: E402
from prototypes import (  # noqa: E402
    SETTINGS,
    load,
    load_runs,
    print_setting_moves,
    rate_shift,
    suite_table,
    train_outside,
    train_runs,
)

from bbfused import optimizer  # noqa: E402
from bbfused.buffer_set import BufferSet  # noqa: E402

METHOD = "bb[push-neutral]"


def install(apply: bool = True) -> None:
    step_as_shipped, measure_as_shipped = optimizer.BB.step, BufferSet.measure
    init_as_shipped = optimizer.BB.__init__
    owner = {}

    @functools.wraps(init_as_shipped)
    def init(self, *args, **kwargs):
        init_as_shipped(self, *args, **kwargs)
        assert self._buffers.momentum > 0 and not self._buffers.nesterov and len(self.param_groups) == 1
        self._window_square_sum = None
        owner[id(self._buffers)] = self

    @functools.wraps(step_as_shipped)
    def step(self, *args, **kwargs):
        epoch, taken = self._clock.counts()
        opening = self._clock.window.opening_step(self.steps_per_epoch)
        if epoch >= 1 and opening is not None and taken >= opening:
            if taken == opening:
                self._window_square_sum = torch.zeros((), dtype=torch.float64)
            decay = self.param_groups[0]["weight_decay"]
            for buffer in self._buffers:
                d = buffer.grad.double() + decay * buffer.param.double()
                self._window_square_sum += d @ d
        return step_as_shipped(self, *args, **kwargs)

    def measure(self, clock, partials=False):
        bb = owner[id(self)]
        square_sum, correction = bb._window_square_sum, None
        if square_sum is not None:
            n = bb._clock.window.window_steps(bb.steps_per_epoch)
            g_square = sum((b.ema.double() @ b.ema.double()) for b in self.buffers)
            variance = (square_sum - n * g_square) / (n - 1)
            share, square = noise_shares(bb.steps_per_epoch, n, self.momentum)
            correction = self.lr.double() * variance * (share - square)
            bb._window_square_sum = None
        sums = measure_as_shipped(self, clock, partials)
        if correction is not None and apply:
            sums = sums.clone()
            if sums.dim() == 1:
                sums[1] += correction
            else:
                sums[1, 0] += correction
        return sums

    optimizer.BB.__init__, optimizer.BB.step, BufferSet.measure = init, step, measure


def outside_table() -> None:
    """Outside the suite: the prototype's runs paired with the default's (the same code, ``--off``)."""
    runs = load_runs(HERE / "outside")
    print_setting_moves(runs, METHOD, runs, "bb")


def rates() -> None:
    """Per suite setting: the prototype's rates over the default's (the median pair, ``prototypes.rate_shift``)."""
    _, runs = load([HERE / "suite"])
    print("| setting | T | rates: push-neutral / default (median pair) | pairs |")
    print("|---|---|---|---|")
    shifts = []
    for name, setting in SETTINGS.items():
        found = rate_shift(runs, name, METHOD, "bb")
        if found is not None:
            shifts.append(found[0])
            print(f"| {name} | {setting.steps_per_epoch()} | {found[0]:.2f} | {found[1]} |")
    print()
    lower, higher = sum(r < 1 for r in shifts), sum(r > 1 for r in shifts)
    tenth, fifth = sum(r < 0.1 for r in shifts), sum(r < 0.2 for r in shifts)
    print(
        f"Rates lower on {lower} of {len(shifts)} settings, higher on {higher}; below a tenth of the default's on "
        f"{tenth}, below a fifth on {fifth}."
    )


if __name__ == "__main__":
    off = "--off" in sys.argv
    arguments = [a for a in sys.argv[1:] if a != "--off"]
    if arguments[0] == "table":
        suite_table(HERE / "suite", METHOD)
    elif arguments[0] == "rates":
        rates()
    elif arguments[0] == "outside-table":
        outside_table()
    elif arguments[0] == "outside":
        install(apply=not off)
        train_outside(
            HERE / "outside", arguments[1], arguments[2] if len(arguments) > 2 else None, "bb" if off else METHOD
        )
    else:
        install(apply=not off)
        train_runs(*arguments[:4], "bb" if off else METHOD)
