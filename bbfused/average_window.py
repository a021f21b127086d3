"""Which steps touch BB's gradient average g, and how: the step's ``ema_mode``.

With momentum in EMA form (m ← m + (1 − μ)·(d − m), θ ← θ − η·m) the point z = θ − c·η·m, c = μ / (1 − μ)
(Nesterov: μ² / (1 − μ)), takes plain SGD steps, z ← z − η·d, while η holds. So the mean of the directions d over the
last n steps of an epoch is (z_a − z_b) / (η·n), z_a where that window opens and z_b at the epoch's end: the default
step writes z_a into g at the window's first step, leaves g alone at every other step but the last, and turns g into
that mean at the last. The other steps move no byte of g, so over an epoch the step moves torch's fused SGD's bytes,
and the estimate holds (``benchmarks/results/2026-12-06_cpu_uniform_window.md``). The first epoch, whose rate
periods are short, averages every step as the paper does (g ← g + β·(d − g)); so do 16-bit parameters, whose
rounding would bury the steps' sum in z, and runs whose epochs ``end_epoch()`` closes (where the window opens is not
known).
"""

from __future__ import annotations

import math
from typing import Union

import torch

# The step's four ways of treating g (the backends' ``ema_mode``).
EMA_UPDATE = 0  # g ← g + β·(d − g)
EMA_KEEP = 1  # g is neither read nor written
WINDOW_OPEN = 2  # g ← θ − c·η·m, θ and m before this step (g is written, not read)
WINDOW_CLOSE = 3  # g ← (g − (θ − c·η·m)) / (η·n), θ and m after this step: the mean of d over the window's n steps
EMA_MODES = (EMA_UPDATE, EMA_KEEP, WINDOW_OPEN, WINDOW_CLOSE)
MIN_WINDOW_STEPS = 2  # the window opens and closes at different steps: a step takes one mode

EmaMode = Union[int, torch.Tensor]


def point_coefficient(momentum: float, nesterov: bool) -> float:
    """c of the point z = θ − c·η·m that steps z ← z − η·d under the default's momentum (EMA form)."""
    return (momentum * momentum if nesterov else momentum) / (1.0 - momentum)


def window_point(
    theta: torch.Tensor, momentum_buffer: torch.Tensor, lr: torch.Tensor, momentum: float, nesterov: bool
) -> torch.Tensor:
    """z = θ − c·η·m in θ's dtype, c·η rounded once from c's and η's rounded values, as the fused kernels take it."""
    return theta - (lr.to(theta.dtype) * point_coefficient(momentum, nesterov)) * momentum_buffer


def check_ema_mode(ema_mode: EmaMode, has_momentum: bool, preconditioned: bool = False, window_steps: int = 0) -> None:
    """Raise for a mode that is not one of EMA_MODES; for a mode other than EMA_UPDATE without a momentum buffer
    averaging d (none, or with Adam's scaling one averaging d / D), which the window's point needs; and for
    ``window_steps`` (the n WINDOW_CLOSE divides by) below MIN_WINDOW_STEPS where the step can close a window
    (WINDOW_CLOSE, or a tensor mode, read on the device, of which only the type is checked)."""
    windowed = has_momentum and not preconditioned
    if isinstance(ema_mode, torch.Tensor):
        if ema_mode.dtype != torch.int32 or ema_mode.numel() != 1:
            raise ValueError(
                f"ema_mode as a tensor must be one int32 value on the device (EMA_UPDATE, EMA_KEEP, WINDOW_OPEN or "
                f"WINDOW_CLOSE), got a {ema_mode.dtype} tensor of {ema_mode.numel()} values"
            )
        fixed = None
    elif ema_mode not in EMA_MODES or isinstance(ema_mode, bool):
        raise ValueError(
            f"ema_mode must be EMA_UPDATE (0), EMA_KEEP (1), WINDOW_OPEN (2) or WINDOW_CLOSE (3) of "
            f"bbfused.average_window, got {ema_mode!r}"
        )
    else:
        fixed = ema_mode
    if fixed != EMA_UPDATE and not windowed:
        raise ValueError(
            f"ema_mode={ema_mode!r} leaves g alone or sets it from the point θ − c·η·m: it needs a momentum_buffer "
            f"and no second_moment; pass EMA_UPDATE"
        )
    closes = fixed == WINDOW_CLOSE or (fixed is None and windowed)  # a tensor mode may close the window
    is_length = isinstance(window_steps, int) and not isinstance(window_steps, bool)
    if closes and not (is_length and window_steps >= MIN_WINDOW_STEPS):
        raise ValueError(
            f"window_steps must be the window's length n >= {MIN_WINDOW_STEPS} where the step can close a window "
            f"(WINDOW_CLOSE divides by η·n), got {window_steps!r}"
        )


class AverageWindow:
    """The mode of each step: g is the mean of d over the last ``fraction`` of every epoch after the first.

    ``fraction`` None (the paper's method, the Adam-scaled mode, or no momentum): every step updates g."""

    def __init__(self, fraction: float | None) -> None:
        self.fraction = fraction

    def window_steps(self, steps_per_epoch: int | None) -> int | None:
        """n, the steps of an epoch's window: ⌈fraction·T⌉, at least MIN_WINDOW_STEPS (None: no window, or an epoch
        shorter than that)."""
        if self.fraction is None or steps_per_epoch is None or steps_per_epoch < MIN_WINDOW_STEPS:
            return None
        return max(MIN_WINDOW_STEPS, math.ceil(steps_per_epoch * self.fraction))

    def opening_step(self, steps_per_epoch: int | None) -> int | None:
        """How many of an epoch's steps come before its window (None: no window)."""
        steps = self.window_steps(steps_per_epoch)
        return None if steps is None else steps_per_epoch - steps

    def steps_since_opening(self, epoch: int, taken: int, steps_per_epoch: int | None) -> int:
        """How many steps of an open window are taken after ``taken`` steps of ``epoch`` (0: no window is open, or
        the next step opens it)."""
        opening = self.opening_step(steps_per_epoch)
        if opening is None or epoch == 0 or taken <= opening:
            return 0
        return taken - opening

    def mode(self, epoch: int | torch.Tensor, taken: int | torch.Tensor, steps_per_epoch: int | None) -> EmaMode:
        """The mode of the step after ``taken`` steps of ``epoch``: an int from host counts, an int32 device tensor
        from device counts (read there by the step; no sync)."""
        opening = self.opening_step(steps_per_epoch)
        if opening is None:
            return EMA_UPDATE
        last = steps_per_epoch - 1
        if not isinstance(taken, torch.Tensor):
            if epoch == 0:
                return EMA_UPDATE
            return WINDOW_OPEN if taken == opening else WINDOW_CLOSE if taken == last else EMA_KEEP
        inside = torch.where(taken == opening, WINDOW_OPEN, torch.where(taken == last, WINDOW_CLOSE, EMA_KEEP))
        return torch.where(epoch == 0, EMA_UPDATE, inside).to(torch.int32)


NO_WINDOW = AverageWindow(None)  # every step updates g
