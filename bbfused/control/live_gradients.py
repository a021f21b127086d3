"""The dead-unit test's measure: the share of the trainable parameters' gradient values that are not exactly zero.

A ReLU unit that no input of a batch activates gets exactly zero gradients on its weights, and a rate that kills
many units at once makes the share collapse while the loss may still look like progress
(``benchmarks/results/2026-12-05_cpu_dead_units.md``). The default rate control (``safeguard``) compares a period's
share with the share at the last good period end (the first step's before any) and rolls the period back when it
fell under :data:`~bbfused.control.safeguard.DEAD_UNIT_SHARE` of it.

A period's share is the larger of its closing step's and the step's before it: an epoch's small last batch
(``drop_last=False``) reaches fewer inputs and units than a full one, which must not read as units that died. It is
a read of the gradients at those two steps of a period; with ``steps_per_epoch=None`` any step may be the last, so
every step is counted and the last two kept, inside ``step()``: a ``zero_grad()`` before ``end_epoch()`` changes
nothing. Frozen parameters (``requires_grad=False``) are left out, so freezing part of a network is not a death.
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
        self.before_end, self.closing = self.period[0], self.period[1]
        self.last = torch.zeros((), dtype=torch.float64, device=device)  # at the last step, when T is not known

    def first_step(self, buffers: EpochBuffers) -> None:
        """The first step's share: the reference until a period ends well."""
        buffers.count_nonzero_gradients(self.reference)

    def step_taken(self, buffers: EpochBuffers, clock: EpochClock) -> None:
        """After the clock counted the step: keep its share when it is the last before its period's closing one (the
        last two steps' when the clock cannot tell)."""
        flag = clock.before_period_end
        if isinstance(flag, torch.Tensor):
            # The closing step's share too, into its slot: a device clock's closing step is gated, not known here.
            buffers.count_nonzero_gradients(self.period, flag, slot=clock.gate)
        elif flag is None:
            self.before_end.copy_(self.last)
            buffers.count_nonzero_gradients(self.last)
        elif flag:
            buffers.count_nonzero_gradients(self.before_end)

    def count_closing_step(self, buffers: EpochBuffers, clock: EpochClock) -> None:
        """The closing step's share into :attr:`closing` (a device clock's step_taken took it already)."""
        if clock.gate is None:
            buffers.count_nonzero_gradients(self.closing)

    def live(self) -> torch.Tensor:
        """The closing period's share: the largest of the closing step's, the step's before it and (without a known
        epoch length) the last step's."""
        return torch.maximum(torch.maximum(self.closing, self.before_end), self.last)

    def references(self, live: torch.Tensor, diverged: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The new shares as (state tensor, value) pairs for the period end's writes: a good period's share becomes
        the reference, and the next period starts with none of its own."""
        return [
            (self.reference, torch.where(diverged, self.reference, live)),
            (self.before_end, torch.zeros_like(self.before_end)),
            (self.last, torch.zeros_like(self.last)),
        ]

    def state(self) -> tuple[float | None, float, float]:
        """The reference (None: none yet), the share before the closing step, the last step's."""
        reference = float(self.reference)
        return (None if reference != reference else reference), float(self.before_end), float(self.last)

    def load(self, reference: float | None, before_end: float, last: float) -> None:
        self.reference.fill_(float("nan") if reference is None else reference)
        self.before_end.fill_(before_end)
        self.last.fill_(last)
