"""The device clock's per-step work as Triton launches (``BB(capturable=True)`` on the Triton backend).

A captured step replays every kernel it launched, so the clock's few dozen 0-dim torch ops (count the step, set the
gates, add the loss, record the rate, publish the next one) would cost a launch each, every step. Here they are two
single programs: :func:`add_loss` (the loss meter) and :func:`finish_period` (the selection of the next rate, the
history, the counters, and the gates of the next step, which a step needs before its passes run, after taking a
scheduler's write into the shown rate). Same arithmetic
as the torch ops of ``bbfused.clock.DeviceClock`` (tests/test_capture.py compares whole runs bit for bit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# One warp (the programs work on scalars), and no fused multiply-add: every product rounded before it is added, as
# the torch ops these kernels replace round it.
SCALAR_OPTIONS = {"num_warps": 1, "enable_fp_fusion": False}


@triton.jit
def _add_loss_kernel(loss_ptr, sum_ptr, steps_ptr, last_ptr, before_last_ptr):
    loss = tl.load(loss_ptr).to(tl.float64)
    tl.store(sum_ptr, tl.load(sum_ptr) + loss)
    tl.store(steps_ptr, tl.load(steps_ptr) + 1.0)
    tl.store(before_last_ptr, tl.load(last_ptr))
    tl.store(last_ptr, loss)


@triton.jit
def _closes(epoch, step, steps_per_epoch, period_length, last_inner_end):
    """Periods.closes: the ``step``-th step of ``epoch`` closes the epoch or one of a split first epoch's periods."""
    inner = (period_length > 0) & (epoch == 0) & (step % tl.maximum(period_length, 1) == 0)
    return (step == steps_per_epoch) | (inner & (step <= last_inner_end))


@triton.jit
def _finish_kernel(
    gate_ptr, epoch_gate_ptr, epoch_ptr, step_ptr, new_base_ptr, rolled_back_ptr, base_ptr, multiplier_ptr, lr_ptr,
    published_ptr, lr_history_ptr, rolled_history_ptr, before_end_ptr, ema_mode_ptr,
    steps_per_epoch, period_length, last_inner_end, capacity, window_opening,
    HAS_ROLLED_BACK: tl.constexpr, HAS_WINDOW: tl.constexpr,
):  # fmt: skip
    """select + record + set_base of DeviceClock, after counting this step; then the gates of the next step, and
    (HAS_WINDOW) its gradient-average mode (AverageWindow.mode: g's window opens after ``window_opening`` steps)."""
    gate = tl.load(gate_ptr) != 0
    ends_epoch = tl.load(epoch_gate_ptr) != 0
    epoch = tl.load(epoch_ptr)
    step = tl.load(step_ptr) + 1
    # A scheduler's write into the shown rate (ShownRate): the multiplier that makes it the rate applied.
    lr = tl.load(lr_ptr)
    base = tl.load(base_ptr)
    taken = (lr != tl.load(published_ptr)) & (lr == lr) & (lr >= 0) & (lr < float("inf"))
    multiplier = tl.where(taken, lr / base, tl.load(multiplier_ptr))
    tl.store(multiplier_ptr, multiplier)
    base = tl.where(gate, tl.load(new_base_ptr), base)
    index = tl.minimum(epoch, capacity - 1)
    # The closing epoch's rate is the one applied during it, recorded before the next is published.
    if ends_epoch:
        tl.store(lr_history_ptr + index, lr)
    if HAS_ROLLED_BACK:
        rolled = (tl.load(rolled_back_ptr) != 0) & gate
        tl.store(rolled_history_ptr + index, (tl.load(rolled_history_ptr + index) != 0) | rolled)
    epoch = epoch + ends_epoch.to(tl.int64)
    step = tl.where(ends_epoch, 0, step)
    tl.store(epoch_ptr, epoch)
    tl.store(step_ptr, step)
    tl.store(base_ptr, base)
    applied = base * multiplier
    tl.store(lr_ptr, applied)
    tl.store(published_ptr, applied)
    # The next step's gates: it closes the epoch, or (first epoch, split) one of its periods; or the step after it does.
    following = step + 1
    next_closes = _closes(epoch, following, steps_per_epoch, period_length, last_inner_end)
    tl.store(epoch_gate_ptr, following == steps_per_epoch)
    tl.store(gate_ptr, next_closes)
    after_closes = _closes(epoch, following + 1, steps_per_epoch, period_length, last_inner_end)
    tl.store(before_end_ptr, (next_closes == 0) & after_closes)
    if HAS_WINDOW:
        # EMA_UPDATE (0) in the first epoch; later WINDOW_OPEN (2) where the window opens, WINDOW_CLOSE (3) at the
        # epoch's last step, EMA_KEEP (1) elsewhere.
        inside = tl.where(step == window_opening, 2, tl.where(step == steps_per_epoch - 1, 3, 1))
        tl.store(ema_mode_ptr, tl.where(epoch == 0, 0, inside).to(tl.int32))


def add_loss(
    loss: torch.Tensor, total: torch.Tensor, steps: torch.Tensor, last: torch.Tensor, before_last: torch.Tensor
) -> None:
    """total += loss; steps += 1; before_last ← last; last ← loss (float64 0-dim tensors; ``loss`` any floating
    dtype)."""
    _add_loss_kernel[(1,)](loss, total, steps, last, before_last, **SCALAR_OPTIONS)


def finish_period(
    clock_tensors: tuple[torch.Tensor, ...],
    new_base: torch.Tensor,
    rolled_back: torch.Tensor | None,
    rate_tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    counts: tuple[int, int, int, int],
    ema_mode: torch.Tensor | None = None,
    window_opening: int = 0,
) -> None:
    """``clock_tensors``: gate, epoch_gate, epoch, step, lr history, rolled-back history, before-period-end flag;
    ``rate_tensors``: base, multiplier, applied lr, its published copy; ``counts``: steps per epoch, the first
    epoch's period length and last inner end, the histories' capacity. ``ema_mode`` (an int32 0-dim tensor, or
    None): set to the next step's gradient-average mode, the window opening after ``window_opening`` steps of each
    epoch after the first."""
    gate, epoch_gate, epoch, step, lr_history, rolled_history, before_end = clock_tensors
    base, multiplier, lr, published = rate_tensors
    _finish_kernel[(1,)](
        gate, epoch_gate, epoch, step, new_base, gate if rolled_back is None else rolled_back, base, multiplier, lr,
        published, lr_history, rolled_history, before_end, gate if ema_mode is None else ema_mode, *counts,
        window_opening,
        HAS_ROLLED_BACK=rolled_back is not None,
        HAS_WINDOW=ema_mode is not None,
        **SCALAR_OPTIONS,
    )  # fmt: skip
