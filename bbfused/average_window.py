"""Which steps update BB's gradient average g, and how: the step's ``ema_mode``.

g's factor is β = 4/T, so the steps before an epoch's last quarter carry only about e⁻¹ of its weight at the epoch's
end. With momentum the default step therefore leaves g alone before that window and starts it from the momentum
buffer m, itself an average of the recent directions d: g ← m + β·(d − m) at the window's first step, the usual
g ← g + β·(d − g) after it. Outside the window the step reads and writes 8 bytes an fp32 element fewer, and the
estimate holds (``benchmarks/results/2026-12-06_cpu_ema_window.md``). The first epoch, whose rate periods are short,
averages every step.
"""

from __future__ import annotations

import math
from typing import Union

import torch

# The step's three ways of treating g (the backends' ``ema_mode``).
EMA_UPDATE = 0  # g ← g + β·(d − g)
EMA_KEEP = 1  # g is neither read nor written
EMA_FROM_MOMENTUM = 2  # g ← m + β·(d − m), m the momentum buffer before this step (g is written, not read)
EMA_MODES = (EMA_UPDATE, EMA_KEEP, EMA_FROM_MOMENTUM)

EmaMode = Union[int, torch.Tensor]


def check_ema_mode(ema_mode: EmaMode, has_momentum: bool, preconditioned: bool = False) -> None:
    """Raise for a mode that is not one of EMA_MODES, or for a mode other than EMA_UPDATE without a momentum buffer
    averaging d (none, or with Adam's scaling one averaging d / D): the window starts g from it. A tensor mode is read
    on the device, so only its type is checked."""
    windowed = has_momentum and not preconditioned
    if isinstance(ema_mode, torch.Tensor):
        if ema_mode.dtype != torch.int32 or ema_mode.numel() != 1:
            raise ValueError(
                f"ema_mode as a tensor must be one int32 value on the device (EMA_UPDATE, EMA_KEEP or "
                f"EMA_FROM_MOMENTUM), got a {ema_mode.dtype} tensor of {ema_mode.numel()} values"
            )
        fixed = None
    elif ema_mode not in EMA_MODES or isinstance(ema_mode, bool):
        raise ValueError(
            f"ema_mode must be EMA_UPDATE (0), EMA_KEEP (1) or EMA_FROM_MOMENTUM (2) of bbfused.average_window, got "
            f"{ema_mode!r}"
        )
    else:
        fixed = ema_mode
    if fixed != EMA_UPDATE and not windowed:
        raise ValueError(
            f"ema_mode={ema_mode!r} leaves g alone or starts it from the momentum buffer: it needs a momentum_buffer "
            f"and no second_moment; pass EMA_UPDATE"
        )


class AverageWindow:
    """The mode of each step: g is updated over the last ``fraction`` of every epoch after the first, from m.

    ``fraction`` None (the paper's method, the Adam-scaled mode, or no momentum): every step updates g."""

    def __init__(self, fraction: float | None) -> None:
        self.fraction = fraction

    def opening_step(self, steps_per_epoch: int | None) -> int | None:
        """How many of an epoch's steps come before its window (None: no window)."""
        if self.fraction is None or steps_per_epoch is None:
            return None
        return steps_per_epoch - max(1, math.ceil(steps_per_epoch * self.fraction))

    def mode(self, epoch: int | torch.Tensor, taken: int | torch.Tensor, steps_per_epoch: int | None) -> EmaMode:
        """The mode of the step after ``taken`` steps of ``epoch``: an int from host counts, an int32 device tensor
        from device counts (read there by the step; no sync)."""
        opening = self.opening_step(steps_per_epoch)
        if opening is None:
            return EMA_UPDATE
        if not isinstance(taken, torch.Tensor):
            if epoch == 0 or taken > opening:
                return EMA_UPDATE
            return EMA_KEEP if taken < opening else EMA_FROM_MOMENTUM
        before = torch.where(taken < opening, EMA_KEEP, EMA_FROM_MOMENTUM)
        return torch.where((epoch == 0) | (taken > opening), EMA_UPDATE, before).to(torch.int32)


NO_WINDOW = AverageWindow(None)  # every step updates g
