"""The epoch clock: where BB counts its steps and epochs and keeps their histories, on the host or on the device.

Two implementations of one interface:

* :class:`HostClock` (the default): Python counters; an epoch end runs once, after the epoch's last step, and its
  decisions are written directly.
* :class:`DeviceClock` (``BB(capturable=True)``): a CUDA graph replays kernels, not Python, so host counters would
  stay frozen at their values during capture. Here the counts and histories are device tensors the captured step
  updates in place; the epoch end runs inside every step, gated by :attr:`DeviceClock.gate` (true at the epoch's
  last step), and every decision is written through :meth:`DeviceClock.commit`. The host reads the counts (one
  sync) only when asked.

The rate controls and the buffers write through the clock (``commit``, ``select``, ``gate``), so neither knows
which clock runs. Each clock also makes the per-epoch loss meter of its kind.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, Union

import torch

from .average_window import EMA_UPDATE, NO_WINDOW, AverageWindow, EmaMode
from .devices import on as _on
from .interrupts import deferred_sigint

# Epochs the device-side histories hold (64 Ki epochs: 576 KiB per device, allocated once).
HISTORY_CAPACITY = 1 << 16

Flag = Union[bool, torch.Tensor]


def choose(flag: Flag, when_true: torch.Tensor, when_false: torch.Tensor) -> torch.Tensor:
    """``when_true`` where ``flag`` holds, else ``when_false``: decided on the host for a bool, on the device (no
    sync) for a bool tensor."""
    if isinstance(flag, torch.Tensor):
        return torch.where(flag.to(when_true.device), when_true, when_false)
    return when_true if flag else when_false


def nan(device: torch.device) -> torch.Tensor:
    return torch.tensor(math.nan, dtype=torch.float64, device=device)


class Periods:
    """Where an epoch's rate periods end. Every epoch is one period, but the first may be split into
    ``first_epoch_periods`` periods of length max(2, T // count), so that the rate control can move the rate several
    times within it; the last one takes the remainder, which for a small T can make one period more (T = 10: five
    periods of 2 steps). Fixed by T and the count: nothing to save."""

    def __init__(self, steps_per_epoch: int | None, first_epoch_periods: int) -> None:
        length = max(2, steps_per_epoch // first_epoch_periods) if steps_per_epoch and first_epoch_periods > 1 else 0
        split = length and steps_per_epoch >= 2 * length
        self.length = length if split else 0
        # The last step at which a period of the first epoch ends before the epoch's own end.
        self.last_inner_end = (steps_per_epoch - length) // length * length if split else 0

    def inner_end(self, step: int) -> bool:
        """Whether a period of the first epoch ends after its ``step``-th step (before the epoch ends)."""
        return bool(self.length) and step % self.length == 0 and step <= self.last_inner_end

    def closes(self, epoch: int, step: int, steps_per_epoch: int | None) -> bool:
        """Whether ``epoch``'s ``step``-th step closes a rate period (the epoch, or one of a split first epoch's)."""
        return step == steps_per_epoch or (epoch == 0 and self.inner_end(step))

    def steps_before(self, step: int) -> int:
        """The steps of the first epoch's period that ends after its ``step``-th step."""
        if not self.length:
            return step
        return self.length if step <= self.last_inner_end else step - self.last_inner_end


class HostLossMeter:
    """The epoch's loss sum on the device (one add per step), its count and last two losses held on the host."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0
        self.no_loss = nan(device)  # what ``last`` is before a step gives a loss: one tensor, never written
        self.last = self.no_loss  # the step's own loss tensor: kept by reference, never written
        self.before_last = self.no_loss  # the step's before it (see :func:`closing_loss`)

    def add(self, loss: torch.Tensor) -> None:
        self.sum.add_(loss)
        self.steps += 1
        self.before_last = self.last
        self.last = loss

    def steps_tensor(self) -> torch.Tensor:
        return torch.full_like(self.sum, self.steps)

    def reset(self, clock: HostClock) -> None:
        self.sum.zero_()
        self.steps = 0
        self.last = self.no_loss
        self.before_last = self.no_loss

    def load(self, loss_sum: float, steps: int) -> None:
        self.sum.fill_(loss_sum)
        self.steps = steps


class DeviceLossMeter:
    """The epoch's loss sum, count and last two losses as device tensors updated in place (four kernels a step)."""

    def __init__(self, device: torch.device) -> None:
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = torch.zeros((), dtype=torch.float64, device=device)
        self.last = nan(device)
        self.before_last = nan(device)

    def add(self, loss: torch.Tensor) -> None:
        self.sum.add_(loss)
        self.steps.add_(1)
        self.before_last.copy_(self.last)
        self.last.copy_(loss)

    def steps_tensor(self) -> torch.Tensor:
        return self.steps

    def reset(self, clock: DeviceClock) -> None:
        self.sum.masked_fill_(clock.gate, 0.0)
        self.steps.masked_fill_(clock.gate, 0.0)
        self.last.masked_fill_(clock.gate, math.nan)
        self.before_last.masked_fill_(clock.gate, math.nan)

    def load(self, loss_sum: float, steps: int) -> None:
        self.sum.fill_(loss_sum)
        self.steps.fill_(steps)


def closing_loss(last: torch.Tensor, before_last: torch.Tensor) -> torch.Tensor:
    """The loss a period closes at, for the tests that look for damage in its last steps: the smaller of its last two
    steps' losses (the last one alone when the period had one). Damage to the weights persists from one step to the
    next, where one batch's loss does not: an epoch's small last batch (``drop_last=False``; a BatchNorm network on
    16 images) or one hard batch can score many times the mean (``benchmarks/results/paper_mnist.md``)."""
    return torch.where(torch.isnan(before_last), last, torch.minimum(last, before_last))


class HostClock:
    """Steps and epochs counted in Python; the epoch end runs after the epoch's last step only."""

    gate = None  # every pass and decision of an epoch end applies

    def __init__(
        self,
        steps_per_epoch: int | None,
        device: torch.device,
        first_epoch_periods: int = 1,
        window: AverageWindow = NO_WINDOW,
    ) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.device = device
        self.periods = Periods(steps_per_epoch, first_epoch_periods)
        self.window = window
        self.epoch = 0
        self.step_in_epoch = 0
        self.first_step_pending = True
        self._lr_history: list[torch.Tensor] = []
        self._rolled_back: list[torch.Tensor] = []
        self._epoch_rolled_back: torch.Tensor | None = None  # any period of the open epoch rolled back

    # ---- the step
    def loss_meter(self, device: torch.device) -> HostLossMeter:
        return HostLossMeter(device)

    def check_loss_number(self, loss: object) -> None:
        """A loss given as a Python number is fine here."""

    def check_capture(self, ranks_checked: bool) -> None:
        """Nothing to check: a host-counted step is never meant to be captured."""

    def check_host_hooks(self) -> None:
        """Hooks at period ends are fine: every period end runs on the host."""

    def steps_whole_buffers(self) -> bool:
        """Whether each step must run over whole buffers: no, the host picks the ranges with gradients."""
        return False

    def ema_mode(self) -> EmaMode:
        """How the running step treats BB's gradient average (``bbfused.average_window``)."""
        return self.window.mode(self.epoch, self.step_in_epoch, self.steps_per_epoch)

    def advance(self) -> bool:
        """Count a step; whether a rate period (the epoch, or a period of the first epoch) ends now."""
        self.first_step_pending = False
        self.step_in_epoch += 1
        inner = self.epoch == 0 and self.periods.inner_end(self.step_in_epoch)
        return inner or self.step_in_epoch == self.steps_per_epoch

    @contextlib.contextmanager
    def epoch_end(self) -> Iterator[None]:
        """Around an epoch end: a Ctrl-C waits until it is done (it must not stop half-way)."""
        with deferred_sigint():
            yield

    # ---- what an epoch end reads and writes
    @property
    def rule_epoch(self) -> int:
        """The closing epoch's index as the BB rule takes it."""
        return self.epoch

    @property
    def closing_steps(self) -> int:
        """T: the steps the closing period took."""
        return self.periods.steps_before(self.step_in_epoch) if self.epoch == 0 else self.step_in_epoch

    @property
    def ends_epoch(self) -> bool:
        """Whether the closing period ends the epoch (end_epoch() ends every epoch it closes)."""
        return self.steps_per_epoch is None or self.step_in_epoch == self.steps_per_epoch

    @property
    def next_epoch(self) -> int:
        """The epoch the next step belongs to."""
        return self.epoch + self.ends_epoch

    @property
    def in_first_epoch_periods(self) -> bool:
        """Whether the closing period is one of a split first epoch's."""
        return self.epoch == 0 and bool(self.periods.length)

    @property
    def closes_inner_period(self) -> bool:
        """Whether the closing period is one of a split first epoch's but not its last."""
        return self.in_first_epoch_periods and not self.ends_epoch

    @property
    def before_period_end(self) -> bool | None:
        """After advance(): whether the counted step is the last before its period's closing one; None when the
        epoch's length is not known (end_epoch() may close it after any step)."""
        if self.steps_per_epoch is None:
            return None
        step, closes = self.step_in_epoch, self.periods.closes
        return not closes(self.epoch, step, self.steps_per_epoch) and closes(self.epoch, step + 1, self.steps_per_epoch)

    def reached(self, epoch: int) -> Flag:
        """Whether the closing epoch is ``epoch`` or later."""
        return self.epoch >= epoch

    def commit(self, target: torch.Tensor, value: torch.Tensor) -> None:
        target.copy_(value)

    def select(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return new

    def record(self, lr: torch.Tensor, rolled_back: torch.Tensor | None) -> None:
        """Close the period that ran at rate ``lr`` (rolled back or not; None: never judged); at the epoch's end,
        record the epoch (its rate: its last period's; rolled back: any of its periods) and start the next."""
        if rolled_back is not None:
            earlier = self._epoch_rolled_back
            self._epoch_rolled_back = rolled_back if earlier is None else earlier | rolled_back
        if not self.ends_epoch:
            return
        self._lr_history.append(lr.clone())
        if self._epoch_rolled_back is not None:
            self._rolled_back.append(self._epoch_rolled_back)
        self._epoch_rolled_back = None
        self.epoch += 1
        self.step_in_epoch = 0

    def shown_rate(self, lr: torch.Tensor) -> float:
        """The rate as the parameter groups show it: a Python float (one read of the rate)."""
        return float(lr)

    def finish_period(
        self, new_base: torch.Tensor, rolled_back: torch.Tensor | None, shown, param_groups: list[dict]
    ) -> None:
        """Close the period: record it, and publish the control's new rate through ``shown`` (a ShownRate)."""
        self.record(shown.buffers.lr, rolled_back)
        shown.set_base(new_base, param_groups)

    # ---- reading and loading
    def lr_history(self) -> list[float]:
        return torch.stack(self._lr_history).tolist() if self._lr_history else []

    def rolled_back_epochs(self) -> list[int]:
        """The completed epochs rolled back, and the open one if one of its periods was."""
        flags = self._rolled_back + ([self._epoch_rolled_back] if self._epoch_rolled_back is not None else [])
        return torch.stack(flags).nonzero().flatten().tolist() if flags else []

    def counts(self) -> tuple[int, int]:
        return self.epoch, self.step_in_epoch

    def load(
        self, epoch: int, step: int, lr_history: list[float], rolled_back: list[int], steps_per_epoch: int | None
    ) -> None:
        """Set from a checked checkpoint (``rolled_back``: the rolled-back epochs' indices)."""
        self.steps_per_epoch = steps_per_epoch
        self.epoch, self.step_in_epoch = epoch, step
        self._lr_history = [torch.tensor(rate, dtype=torch.float64, device=self.device) for rate in lr_history]
        flagged = set(rolled_back)
        self._rolled_back = [torch.tensor(e in flagged, device=self.device) for e in range(epoch)]
        self._epoch_rolled_back = torch.tensor(True, device=self.device) if epoch in flagged else None
        self.first_step_pending = epoch == 0 and step == 0


class DeviceClock:
    """Steps and epochs counted on the device; the epoch end runs in every step, acting only at the epoch's last."""

    counted = True  # while a step's epoch end runs, ``step`` includes it

    def __init__(
        self,
        steps_per_epoch: int,
        device: torch.device,
        first_epoch_periods: int = 1,
        window: AverageWindow = NO_WINDOW,
    ) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.device = device
        self.periods = Periods(steps_per_epoch, first_epoch_periods)
        self.window = window
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.epoch = torch.zeros((), dtype=torch.int64, device=device)
        # gate: a rate period ends at this step; epoch_gate: the epoch ends (the same tensor without split periods).
        self.epoch_gate = torch.zeros((), dtype=torch.bool, device=device)
        self.gate = torch.zeros((), dtype=torch.bool, device=device) if self.periods.length else self.epoch_gate
        # The step is the last before its period's closing one (HostClock.before_period_end).
        self.before_period_end = torch.zeros((), dtype=torch.bool, device=device)
        self._lr_history = torch.full((HISTORY_CAPACITY,), math.nan, dtype=torch.float64, device=device)
        self._rolled_back = torch.zeros(HISTORY_CAPACITY, dtype=torch.bool, device=device)
        # The first step records host-side state a replay never updates (where a diverged epoch 0 returns to, the
        # ranks' check): it must run eagerly.
        self.first_step_pending = True

    # ---- the step
    def loss_meter(self, device: torch.device) -> DeviceLossMeter:
        return DeviceLossMeter(device)

    def check_loss_number(self, loss: object) -> None:
        raise TypeError(
            f"BB(capturable=True) takes the loss as a tensor, got the number {loss!r}: a number would be fixed in a "
            f"captured graph. Pass the loss tensor itself (loss=loss, not loss.item())"
        )

    def check_capture(self, ranks_checked: bool) -> None:
        if (self.first_step_pending or not ranks_checked) and _capturing():
            raise RuntimeError(
                "BB(capturable=True): run at least one step() eagerly before capturing it in a CUDA graph (the "
                "warm-up iterations torch.cuda.graph needs anyway), after building, load_state_dict() and "
                "add_param_group() alike: that step records where a diverged first epoch returns to and checks the "
                "ranks, host work a replay would never repeat"
            )

    def check_host_hooks(self) -> None:
        raise RuntimeError(
            "BB(capturable=True) decides its rollbacks on the device, inside a captured step that never returns to "
            "Python: it cannot call rollback or period-end hooks. Read opt.rolled_back_epochs after replays (it "
            "synchronises) and act on new entries, or build BB with capturable=False to use hooks"
        )

    def steps_whole_buffers(self) -> bool:
        """A captured step cannot choose its ranges on the host at replay: it steps whole buffers."""
        return True

    def ema_mode(self) -> EmaMode:
        """How the running step treats BB's gradient average: from the counters, on the device (no sync)."""
        return self.window.mode(self.epoch, self.step, self.steps_per_epoch)

    def advance(self) -> bool:
        """Count a step and set the gates (a period ends, the epoch ends); the period end always runs, gated."""
        self.first_step_pending = False
        self.step.add_(1)
        torch.eq(self.step, self.steps_per_epoch, out=self.epoch_gate)
        if self.periods.length:
            torch.logical_or(self.epoch_gate, self._inner_end(self.step), out=self.gate)
        # The next step is in the same epoch unless the gate is set, and then the flag is false whatever it closes.
        torch.logical_and(~self.gate, self._closes(self.step + 1), out=self.before_period_end)
        return True

    def _inner_end(self, step: torch.Tensor) -> torch.Tensor:
        """Whether the open epoch's ``step``-th step closes one of a split first epoch's periods before its end."""
        periods = self.periods
        return (self.epoch == 0) & (step % periods.length == 0) & (step <= periods.last_inner_end)

    def _closes(self, step: torch.Tensor) -> torch.Tensor:
        """Periods.closes on the device: the open epoch's ``step``-th step closes a rate period."""
        ends_epoch = step == self.steps_per_epoch
        return ends_epoch | self._inner_end(step) if self.periods.length else ends_epoch

    @contextlib.contextmanager
    def epoch_end(self) -> Iterator[None]:
        """Kernels only, every step: nothing to hold back."""
        yield

    # ---- what an epoch end reads and writes
    @property
    def rule_epoch(self) -> torch.Tensor:
        return self.epoch

    @property
    def closing_steps(self) -> int | torch.Tensor:
        periods = self.periods
        if not periods.length:
            return self.steps_per_epoch
        step = self.step if self.counted else self.step + 1  # the closing step included
        first = torch.where(step <= periods.last_inner_end, periods.length, step - periods.last_inner_end)
        return torch.where(self.epoch == 0, first, self.steps_per_epoch)

    @property
    def ends_epoch(self) -> torch.Tensor:
        return self.epoch_gate

    @property
    def next_epoch(self) -> torch.Tensor:
        return self.epoch + self.epoch_gate.to(torch.int64)

    @property
    def in_first_epoch_periods(self) -> Flag:
        return (self.epoch == 0) if self.periods.length else False

    @property
    def closes_inner_period(self) -> Flag:
        return ((self.epoch == 0) & ~self.epoch_gate) if self.periods.length else False

    def reached(self, epoch: int) -> Flag:
        return self.epoch >= epoch

    def commit(self, target: torch.Tensor, value: torch.Tensor) -> None:
        torch.where(_on(self.gate, target.device), value, target, out=target)

    def select(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(_on(self.gate, new.device), new, old)

    def record(self, lr: torch.Tensor, rolled_back: torch.Tensor | None) -> None:
        index = self.epoch.clamp(max=HISTORY_CAPACITY - 1).reshape(1)
        at_end = self.epoch_gate
        self._lr_history.index_put_((index,), torch.where(at_end, lr, self._lr_history.index_select(0, index)))
        if rolled_back is not None:
            flag = rolled_back & self.gate
            self._rolled_back.index_put_((index,), flag | self._rolled_back.index_select(0, index))
        self.epoch.add_(at_end.to(torch.int64))
        self.step.masked_fill_(at_end, 0)

    def shown_rate(self, lr: torch.Tensor) -> torch.Tensor:
        """The rate tensor itself: a captured step cannot write a float."""
        return lr

    def finish_period(
        self, new_base: torch.Tensor, rolled_back: torch.Tensor | None, shown, param_groups: list[dict]
    ) -> None:
        """Close the period where the gate is set: take a scheduler's write into the shown rate, record the period,
        and publish the control's new rate (else the old)."""
        shown.take_write_in_place()
        base = self.select(new_base, shown.base)
        self.record(shown.buffers.lr, rolled_back)
        shown.set_base(base, param_groups)

    # ---- reading and loading
    def counts(self) -> tuple[int, int]:
        """The epoch and the step in it (one sync)."""
        epoch, step = int(self.epoch), int(self.step)
        if epoch > HISTORY_CAPACITY:
            raise RuntimeError(
                f"BB(capturable=True) records the rates of at most {HISTORY_CAPACITY} epochs on the device and this "
                f"run has {epoch}: its history is lost. Runs that long need capturable=False (or a state dict saved "
                f"before epoch {HISTORY_CAPACITY}, loaded into a capturable=False optimizer)"
            )
        return epoch, step

    def lr_history(self) -> list[float]:
        epoch, _ = self.counts()
        return self._lr_history[:epoch].tolist()

    def rolled_back_epochs(self) -> list[int]:
        """The completed epochs rolled back, and the open one if one of its periods was."""
        epoch, _ = self.counts()
        return self._rolled_back[: min(epoch + 1, HISTORY_CAPACITY)].nonzero().flatten().tolist()

    def load(
        self, epoch: int, step: int, lr_history: list[float], rolled_back: list[int], steps_per_epoch: int | None
    ) -> None:
        """Set from a checked checkpoint, in place; raises before writing anything when it does not fit."""
        if epoch > HISTORY_CAPACITY:
            raise ValueError(
                f"the state dict has {epoch} epochs; BB(capturable=True) keeps at most {HISTORY_CAPACITY} on the "
                f"device: resume it with capturable=False"
            )
        self.steps_per_epoch = steps_per_epoch
        self.epoch.fill_(epoch)
        self.step.fill_(step)
        self._lr_history.fill_(math.nan)
        self._lr_history[:epoch] = torch.tensor(lr_history, dtype=torch.float64)
        self._rolled_back.zero_()
        if rolled_back:
            self._rolled_back[torch.tensor(rolled_back, dtype=torch.int64)] = True
        self.first_step_pending = epoch == 0 and step == 0


class KernelLossMeter(DeviceLossMeter):
    """A device loss meter whose add is one Triton launch (``clock_kernels``)."""

    def add(self, loss: torch.Tensor) -> None:
        from . import clock_kernels

        clock_kernels.add_loss(loss, self.sum, self.steps, self.last, self.before_last)


class KernelDeviceClock(DeviceClock):
    """The device clock on the Triton backend: a step's counting, history and rate publication are one launch at its
    end (``clock_kernels.finish_period``), which also sets the gates of the next step; so while a step runs the
    counters hold the steps before it and the gates are already its own."""

    counted = False  # the step counter excludes the running step (DeviceClock: includes it)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """DeviceClock's arguments."""
        super().__init__(*args, **kwargs)
        # The next step's gradient-average mode, set with the gates (no launch of its own).
        self._ema_mode = torch.zeros((), dtype=torch.int32, device=self.device)
        self._set_gates()

    def loss_meter(self, device: torch.device) -> KernelLossMeter:
        return KernelLossMeter(device)

    def advance(self) -> bool:
        """Nothing to count yet (the period end counts the step); the period end always runs, gated."""
        self.first_step_pending = False
        return True

    def finish_period(
        self, new_base: torch.Tensor, rolled_back: torch.Tensor | None, shown, param_groups: list[dict]
    ) -> None:
        from . import clock_kernels

        tensors = (self.gate, self.epoch_gate, self.epoch, self.step, self._lr_history, self._rolled_back,
                   self.before_period_end)  # fmt: skip
        counts = (self.steps_per_epoch, self.periods.length, self.periods.last_inner_end, HISTORY_CAPACITY)
        opening = self.window.opening_step(self.steps_per_epoch)
        mode = None if opening is None else self._ema_mode
        rates = (*shown.rate_tensors(), shown.published_rate)
        clock_kernels.finish_period(tensors, new_base, rolled_back, rates, counts, mode, opening or 0)
        shown.published(param_groups, remembered=True)

    def load(
        self, epoch: int, step: int, lr_history: list[float], rolled_back: list[int], steps_per_epoch: int | None
    ) -> None:
        super().load(epoch, step, lr_history, rolled_back, steps_per_epoch)
        self._set_gates()

    def _set_gates(self) -> None:
        """The gates of the next step, from the counts (on the host: at construction and loading only)."""
        epoch, step, steps_per_epoch = int(self.epoch), int(self.step) + 1, self.steps_per_epoch
        closes = self.periods.closes(epoch, step, steps_per_epoch)
        self.epoch_gate.fill_(step == steps_per_epoch)
        self.gate.fill_(closes)
        self.before_period_end.fill_(not closes and self.periods.closes(epoch, step + 1, steps_per_epoch))
        self._ema_mode.fill_(self.window.mode(epoch, step - 1, steps_per_epoch))

    def ema_mode(self) -> EmaMode:
        """The running step's gradient-average mode, as the last step's finish kernel set it."""
        return EMA_UPDATE if self.window.opening_step(self.steps_per_epoch) is None else self._ema_mode


EpochClock = Union[HostClock, DeviceClock]


def make_clock(
    capturable: bool,
    steps_per_epoch: int | None,
    device: torch.device,
    first_epoch_periods: int = 1,
    kernels: bool = False,
    window: AverageWindow = NO_WINDOW,
) -> EpochClock:
    """The host clock, or (``capturable``) the device clock: its Triton form with ``kernels`` (the buffers run on
    the Triton backend on ``device``). ``window``: which steps update BB's gradient average."""
    kind = HostClock if not capturable else KernelDeviceClock if kernels else DeviceClock
    return kind(steps_per_epoch, device, first_epoch_periods, window)


def _capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
