"""The dead-unit test's measure: the share of the trainable parameters' gradient values that are finite and not zero.

A ReLU unit that no input of a batch activates gets exactly zero gradients on its weights, and a rate that kills
many units at once makes the share collapse while the loss may still look like progress
(``benchmarks/results/2026-12-05_cpu_dead_units.md``). The default rate control (``safeguard``) compares a period's
share with the share at the last good period end (the first step's before any) and rolls the period back when it
fell under :data:`~bbfused.control.safeguard.DEAD_UNIT_SHARE` of it. A second such period in a row is kept and its
share becomes the reference, as a second rollback by the loss alone is kept: restoring the weights did not bring the
share back, so what changed is not the units (the batches, or the part of the network that gets gradients), and
rolling back every period after it would stop the run.

A period's share is the larger of its closing step's and the step's before it: an epoch's small last batch
(``drop_last=False``) reaches fewer inputs and units than a full one, which must not read as units that died. It is
a read of the gradients at those two steps of a period, inside ``step()``. With ``steps_per_epoch=None`` the test is
off: any step may be the last, and counting every step would cost a read of the gradients per step. Parameters
without a gradient in the step (frozen, or not reached by backward since ``zero_grad(set_to_none=True)``) are left
out, so freezing part of a network, or a branch the batches stop reaching, is not a death.
"""

from __future__ import annotations

import torch

from ..buffer_set import EpochBuffers
from ..clock import EpochClock, nan


class GradientShares:
    """The shares the test compares, as float64 0-dim tensors on the control's device, written in place (a step
    captured in a CUDA graph replays their addresses)."""

    def __init__(self, device: torch.device) -> None:
        self.reference = nan(device)  # at the last good period end; NaN: none yet (the test cannot fire)
        # At the step before the closing one, and at the closing step: one tensor, so that a device clock takes both
        # with one gated launch a step.
        self.period = torch.zeros(2, dtype=torch.float64, device=device)
        self.rolled_back = torch.tensor(False, device=device)  # the last period was rolled back by this test

    # Views made on each use: a view kept as an attribute would come out of a pickled copy as a tensor of its own.
    @property
    def before_end(self) -> torch.Tensor:
        return self.period[0]

    @property
    def closing(self) -> torch.Tensor:
        return self.period[1]

    def first_step(self, buffers: EpochBuffers, skip: torch.Tensor | None) -> None:
        """The first step's share: the reference until a period ends well (none when GradScaler skips the step)."""
        buffers.nonzero_gradient_share(self.reference, skip=skip)

    def step_taken(self, buffers: EpochBuffers, clock: EpochClock, closes: bool, skip: torch.Tensor | None) -> None:
        """After the clock counted the step (``closes``: a host clock closes a period now): keep its share when it is
        its period's closing step or the step before it (none when the clock cannot tell: the test is off). A step
        GradScaler skips (``skip``: its found_inf) gives none."""
        flag = clock.before_period_end
        if isinstance(flag, torch.Tensor):
            # A device clock's closing step is gated, not known here: the gate picks the slot.
            buffers.nonzero_gradient_share(self.period, flag, slot=clock.gate, skip=skip)
        elif flag is not None and (flag or closes):
            buffers.nonzero_gradient_share(self.before_end if flag else self.closing, skip=skip)

    def live(self) -> torch.Tensor:
        """The closing period's share: the larger of the closing step's and the step's before it; 0 when neither was
        taken (both skipped, or no known epoch length)."""
        return torch.maximum(self.closing, self.before_end)

    def references(
        self, live: torch.Tensor, diverged: torch.Tensor, dead: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The new state as (state tensor, value) pairs for the period end's writes: a good period's share becomes
        the reference (unless it has none), the next period starts with none of its own, and whether this test
        rolled the period back (``dead``) is kept for the next."""
        kept = diverged | ~(live > 0)
        return [
            (self.reference, torch.where(kept, self.reference, live)),
            (self.period, torch.zeros_like(self.period)),
            (self.rolled_back, dead),
        ]

    def reset(self) -> None:
        """No reference (parameters were added: the shares' denominator changed) and no share of this period."""
        self.load(None, 0.0, False)

    def state(self) -> tuple[float | None, float, bool]:
        """The reference (None: none yet), the share of the step before the closing one, and whether the last period
        was rolled back by this test."""
        reference = float(self.reference)
        return (None if reference != reference else reference), float(self.before_end), bool(self.rolled_back)

    def load(self, reference: float | None, before_end: float, rolled_back: bool) -> None:
        self.reference.fill_(float("nan") if reference is None else reference)
        self.period.copy_(torch.tensor([before_end, 0.0], dtype=torch.float64))
        self.rolled_back.fill_(rolled_back)
