"""The default rate control's period-end decision as one Triton program (CUDA; the interpreter on CPU tensors).

:class:`~bbfused.control.safeguard.SafeguardControl` decides with about a hundred tiny torch ops over 0-dim
tensors; on a GPU each is a kernel launch, and a step captured in a CUDA graph replays all of them every step. Here
the same decision is a single program over the scalars, in float64 with torch's semantics (NaN-propagating
minimum and maximum, ``fmax``, ``nan_to_num``), so it gives the torch ops' bits (tests/test_safeguard_kernel.py
compares them on random and non-finite states). Two launches a period end (one under a device clock):

- :func:`decide`: reads the pass sums, the loss meter and the control's state; writes the decision (diverged, the
  next applied rate) and the new state into a pending vector, nothing the decision reads.
- :func:`apply` (host clock): copies the pending state into the control's tensors and resets the loss meter, after
  the buffers' commit pass has run: an exception between the two leaves the state as it was, and the period end
  runs again with the same result. Under a device clock the decision writes the state itself (gated): a captured
  step cannot stop half-way.

The control hands over its constants (:class:`KernelPolicy`: the policy keeps one home, ``safeguard``), passed
as float64 arguments; the float32 rounding the torch code applies to the first epoch's two rise tolerances (before
and after progress) is reproduced on the host (:func:`rise_factor`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from ..clock import DeviceClock, EpochClock
from ..clock_kernels import SCALAR_OPTIONS

# The order of the control's state in the pending vector (bools as 0.0 / 1.0).
PENDING = (
    "loss_rollback", "best_loss", "last_loss", "snapshot_sq_norm", "snapshot_loss", "lr_cap", "good_lr",
    "has_snapshot", "searching", "ceiling", "rate", "live_reference", "live_before", "live_closing", "live_rolled_back",
)  # fmt: skip
DBL_MAX = 1.7976931348623157e308
REDUCE_BLOCK = 1024  # partials added per iteration of the decision's reduction


@triton.jit
def _isnan(x):
    return x != x


@triton.jit
def _isfinite(x):
    return (x - x) == 0  # inf - inf and NaN - NaN are NaN


@triton.jit
def _minimum(a, b):
    """torch.minimum: NaN when either is NaN."""
    return tl.where(_isnan(a), a, tl.where(_isnan(b), b, tl.where(a < b, a, b)))


@triton.jit
def _maximum(a, b):
    """torch.maximum: NaN when either is NaN."""
    return tl.where(_isnan(a), a, tl.where(_isnan(b), b, tl.where(a > b, a, b)))


@triton.jit
def _fmax(a, b):
    """torch.fmax: the other one when one is NaN."""
    return tl.where(_isnan(a), b, tl.where(_isnan(b), a, tl.where(a < b, b, a)))


@triton.jit
def _clamp_min(x, low):
    return tl.where(_isnan(x), x, tl.where(x < low, low, x))


@triton.jit
def _clamp_max(x, high):
    return tl.where(_isnan(x), x, tl.where(x > high, high, x))


@triton.jit
def _nan_to_num(x, dbl_max):
    """torch.nan_to_num(x): NaN → 0, ±inf → ±the largest finite float64 (``dbl_max``: a float64 argument, as a
    literal Triton would make it float32 inf)."""
    x = tl.where(_isnan(x), 0.0, x)
    x = tl.where(x == float("inf"), dbl_max, x)
    return tl.where(x == -float("inf"), -dbl_max, x)


@triton.jit
def _f64(ptr):
    return tl.load(ptr).to(tl.float64)


@triton.jit
def _flag(ptr):
    return tl.load(ptr) != 0


@triton.jit
def _wrecked(loss, compared, margin, loss_growth):
    return (compared > 0) & (loss > loss_growth * compared) & (loss - compared > margin)


@triton.jit
def _decide_kernel(
    sums_ptr, n_partials, loss_sum_ptr, loss_steps_ptr, last_ptr, before_last_ptr,
    rate_ptr, ceiling_ptr, snapshot_sq_ptr, lr_cap_ptr, good_lr_ptr, initial_ptr, best_ptr, last_loss_ptr,
    snapshot_loss_ptr, searching_ptr, has_snapshot_ptr, loss_rollback_ptr,
    live_closing_ptr, live_before_ptr, live_reference_ptr, live_rolled_back_ptr,
    epoch_ptr, step_ptr, epoch_gate_ptr, gate_ptr, anneal_ptr,
    pending_ptr, diverged_ptr, applied_ptr,
    host_loss_steps: tl.float64, host_closing_steps: tl.float64, host_in_first, host_search_open,
    host_anneal: tl.float64, rise_factor: tl.float64, progressed_rise_factor: tl.float64,
    weight_floor: tl.float64, lowest: tl.float64,
    highest: tl.float64, weight_growth: tl.float64, loss_margin: tl.float64, loss_growth: tl.float64,
    stuck_movement_sq: tl.float64, stuck_fraction: tl.float64, search_growth: tl.float64,
    search_limit: tl.float64, growth_limit: tl.float64, shrink_limit: tl.float64, loss_brake: tl.float64,
    ceiling_fraction: tl.float64, backoff: tl.float64, cap: tl.float64, rise_rollback: tl.float64,
    first_rise_rollback: tl.float64, search_until: tl.float64, dead_unit_share: tl.float64, dbl_max: tl.float64,
    period_length, last_inner_end, steps_per_epoch, epochs, step_offset,
    DEVICE_CLOCK: tl.constexpr, HAS_SHARES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program: the decision of SafeguardControl.diverged, next_rate and close_epoch, line for line."""
    # tl.full keeps the float64 arguments' value under the interpreter too, which rounds bare floats to float32.
    host_loss_steps = tl.full((), host_loss_steps, tl.float64)
    host_closing_steps = tl.full((), host_closing_steps, tl.float64)
    host_anneal = tl.full((), host_anneal, tl.float64)
    rise_factor = tl.full((), rise_factor, tl.float64)
    progressed_rise_factor = tl.full((), progressed_rise_factor, tl.float64)
    weight_floor = tl.full((), weight_floor, tl.float64)
    lowest = tl.full((), lowest, tl.float64)
    highest = tl.full((), highest, tl.float64)
    weight_growth = tl.full((), weight_growth, tl.float64)
    loss_margin = tl.full((), loss_margin, tl.float64)
    loss_growth = tl.full((), loss_growth, tl.float64)
    stuck_movement_sq = tl.full((), stuck_movement_sq, tl.float64)
    stuck_fraction = tl.full((), stuck_fraction, tl.float64)
    search_growth = tl.full((), search_growth, tl.float64)
    search_limit = tl.full((), search_limit, tl.float64)
    growth_limit = tl.full((), growth_limit, tl.float64)
    shrink_limit = tl.full((), shrink_limit, tl.float64)
    loss_brake = tl.full((), loss_brake, tl.float64)
    ceiling_fraction = tl.full((), ceiling_fraction, tl.float64)
    backoff = tl.full((), backoff, tl.float64)
    cap = tl.full((), cap, tl.float64)
    rise_rollback = tl.full((), rise_rollback, tl.float64)
    first_rise_rollback = tl.full((), first_rise_rollback, tl.float64)
    search_until = tl.full((), search_until, tl.float64)
    dead_unit_share = tl.full((), dead_unit_share, tl.float64)
    dbl_max = tl.full((), dbl_max, tl.float64)
    if DEVICE_CLOCK:
        epoch = tl.load(epoch_ptr)
        step = tl.load(step_ptr) + step_offset  # the steps of the epoch, the closing one included
        ends_epoch = _flag(epoch_gate_ptr)
        loss_steps = _f64(loss_steps_ptr)
        split = period_length > 0
        first = tl.where(step <= last_inner_end, period_length, step - last_inner_end).to(tl.int64)
        whole = tl.full((), steps_per_epoch, tl.int64)
        steps = tl.where(split & (epoch == 0), first, whole).to(tl.float64)
        in_first = split & (epoch == 0)
        search_open = (split == 0) | ((epoch == 0) & (ends_epoch == 0))
        next_epoch = epoch + ends_epoch.to(tl.int64)
        index = tl.minimum(tl.maximum(next_epoch, 0), tl.maximum(epochs - 1, 0))
        anneal = tl.load(anneal_ptr + index, mask=epochs > 0, other=1.0).to(tl.float64)
    else:
        loss_steps = host_loss_steps
        steps = host_closing_steps
        in_first = host_in_first != 0
        search_open = host_search_open != 0
        anneal = host_anneal

    # ---- diverged()
    delta_sq = _row_sum(sums_ptr, n_partials, 0, BLOCK)
    dot = _row_sum(sums_ptr, n_partials, 1, BLOCK)
    param_sq = _row_sum(sums_ptr, n_partials, 2, BLOCK)
    ema_sq = _row_sum(sums_ptr, n_partials, 3, BLOCK)
    snapshot_sq = _f64(snapshot_sq_ptr)
    limit = weight_growth * _clamp_min(snapshot_sq, weight_floor)
    loss_sum = _f64(loss_sum_ptr)
    mean = loss_sum / loss_steps
    complete = loss_steps == steps
    initial = _f64(initial_ptr)
    last = _f64(last_ptr)
    before_last = _f64(before_last_ptr)
    closing = tl.where(_isnan(before_last), last, _minimum(last, before_last))  # clock.closing_loss
    best = _f64(best_ptr)
    reference = tl.where(_isnan(best), initial, best)
    learning = complete & (mean < reference)
    weights_bad = ((param_sq <= limit) == 0) & ((learning & _isfinite(param_sq)) == 0)
    weights_bad = weights_bad | (_isfinite(ema_sq) == 0)
    margin = loss_margin * _clamp_min(_nan_to_num(initial, dbl_max), 0.0)
    snapshot_loss = _f64(snapshot_loss_ptr)
    compared = _fmax(best, snapshot_loss)
    moved = delta_sq > stuck_movement_sq * snapshot_sq
    stuck = _isnan(best) & (initial > 0) & (mean > stuck_fraction * initial) & moved
    bad_mean = (_isfinite(mean) == 0) | _wrecked(mean, compared, margin, loss_growth)
    bad_last = (_isfinite(last) == 0) | _wrecked(closing, compared, margin, loss_growth)
    loss_bad = complete & (bad_mean | bad_last | stuck)
    loss_rollback = _flag(loss_rollback_ptr)
    accept_anyway = loss_rollback & (weights_bad == 0) & _isfinite(mean) & _isfinite(last) & (stuck == 0)
    diverged = weights_bad | (loss_bad & (accept_anyway == 0))
    # A rise rolled back (not right after a loss rollback: then the snapshot is no better).
    last_loss = _f64(last_loss_ptr)
    progressed = (initial > 0) & (best < search_until * initial)
    rollback_factor = tl.where(in_first & (progressed == 0), first_rise_rollback, rise_rollback)
    risen = complete & (diverged == 0) & (loss_rollback == 0) & (last_loss > 0) & (mean > rollback_factor * last_loss)
    risen = risen & (mean - last_loss > margin)
    diverged = diverged | risen
    # Without the test (a share of 0) nothing is dead: the loads then read the rate's tensor, never used.
    live = _maximum(_f64(live_closing_ptr), _f64(live_before_ptr))
    live_reference = _f64(live_reference_ptr)
    # A second fall in a row is kept (its share becomes the reference): the rollback did not bring it back.
    dead = (diverged == 0) & (live < dead_unit_share * live_reference) & (live > 0) & (_flag(live_rolled_back_ptr) == 0)
    diverged = diverged | dead
    weights_bad = weights_bad | dead
    near_start = complete & (initial > 0) & (mean > search_until * initial)
    good_loss = complete & (diverged == 0)
    lower = good_loss & ((mean >= best) == 0)
    factor = tl.where(in_first, tl.where(progressed, progressed_rise_factor, rise_factor), 1.0)
    # 2 - factor is exact in float32 and float64 alike (Sterbenz: the factor is 1 plus a tolerance in [0, 1]), so a
    # negative bound has torch's bits too.
    rise_bound = tl.where(last_loss > 0, last_loss * factor, last_loss * (2.0 - factor))
    rose = good_loss & (mean > rise_bound)
    nan = tl.full((), float("nan"), tl.float64)
    new_best = tl.where(lower | (accept_anyway & good_loss), mean, best)
    new_last_loss = tl.where(diverged, last_loss, tl.where(good_loss, mean, nan))
    new_snapshot_sq = tl.where(diverged, snapshot_sq, param_sq)
    new_snapshot_loss = tl.where(diverged, snapshot_loss, tl.where(good_loss, closing, nan))

    # ---- next_rate()
    r = _f64(rate_ptr)
    estimate = delta_sq / (steps * tl.abs(dot))
    usable = _isfinite(estimate) & (estimate > 0) & _flag(has_snapshot_ptr)
    searching = _flag(searching_ptr) & (rose == 0) & ((usable & (estimate < r)) == 0) & (diverged == 0)
    searching = searching & (search_open | near_start)
    search = _maximum(r * search_growth, _minimum(estimate, r * search_limit))
    growth = tl.where(rose, loss_brake, growth_limit)
    follow = _minimum(_maximum(estimate, r * shrink_limit), r * growth)
    kept = tl.where(usable, tl.where(searching, search, follow), _minimum(r, r * growth))
    old_ceiling = _f64(ceiling_ptr)
    ceiling = tl.where(rose | risen, _minimum(old_ceiling, r * ceiling_fraction), old_ceiling)
    kept = _minimum(kept, tl.where(rose, ceiling, _maximum(ceiling, r)))
    lr_cap = _f64(lr_cap_ptr)
    kept = _minimum(_clamp_max(_clamp_min(kept, lowest), highest), lr_cap)
    good_lr = _f64(good_lr_ptr)
    backed_off = tl.where(_isnan(good_lr), r * backoff, _minimum(good_lr, r * cap))
    rise_rate = _minimum(tl.where(_isnan(good_lr), r * loss_brake, good_lr), ceiling)
    backed_off = tl.where(risen, rise_rate, backed_off)
    new_rate = tl.where(diverged, _clamp_max(backed_off, highest), kept)

    # ---- close_epoch()'s writes: pending under a host clock, directly (at a period end) under a device clock
    tl.store(pending_ptr + 0, (diverged & (weights_bad == 0)).to(tl.float64))
    tl.store(pending_ptr + 1, new_best)
    tl.store(pending_ptr + 2, new_last_loss)
    tl.store(pending_ptr + 3, new_snapshot_sq)
    tl.store(pending_ptr + 4, new_snapshot_loss)
    tl.store(pending_ptr + 5, tl.where(diverged & (risen == 0), _minimum(lr_cap, r * cap), lr_cap))
    tl.store(pending_ptr + 6, tl.where(diverged, good_lr, r))
    tl.store(pending_ptr + 7, (diverged == 0).to(tl.float64))
    tl.store(pending_ptr + 8, searching.to(tl.float64))
    tl.store(pending_ptr + 9, ceiling)
    tl.store(pending_ptr + 10, new_rate)
    if HAS_SHARES:
        # A good period's share becomes the reference unless it has none (every count of it skipped).
        tl.store(pending_ptr + 11, tl.where(diverged | ((live > 0) == 0), live_reference, live))
        tl.store(pending_ptr + 12, tl.full((), 0.0, tl.float64))
        tl.store(pending_ptr + 13, tl.full((), 0.0, tl.float64))
        tl.store(pending_ptr + 14, dead.to(tl.float64))
    tl.store(diverged_ptr, diverged)
    tl.store(applied_ptr, new_rate * anneal)
    if DEVICE_CLOCK:
        if tl.load(gate_ptr) != 0:
            _write_state(
                pending_ptr, loss_rollback_ptr, best_ptr, last_loss_ptr, snapshot_sq_ptr, snapshot_loss_ptr,
                lr_cap_ptr, good_lr_ptr, has_snapshot_ptr, searching_ptr, ceiling_ptr, rate_ptr, loss_sum_ptr,
                loss_steps_ptr, last_ptr, before_last_ptr, live_closing_ptr, live_before_ptr, live_reference_ptr,
                live_rolled_back_ptr, True, HAS_SHARES,
            )  # fmt: skip


@triton.jit
def _write_state(
    pending_ptr, loss_rollback_ptr, best_ptr, last_loss_ptr, snapshot_sq_ptr, snapshot_loss_ptr, lr_cap_ptr,
    good_lr_ptr, has_snapshot_ptr, searching_ptr, ceiling_ptr, rate_ptr, loss_sum_ptr, loss_steps_ptr, last_ptr,
    before_last_ptr, live_closing_ptr, live_before_ptr, live_reference_ptr, live_rolled_back_ptr,
    DEVICE_METER: tl.constexpr,
    HAS_SHARES: tl.constexpr,
):  # fmt: skip
    """The pending state into the control's tensors, and the loss meter reset."""
    tl.store(loss_rollback_ptr, tl.load(pending_ptr + 0) != 0)
    tl.store(best_ptr, tl.load(pending_ptr + 1))
    tl.store(last_loss_ptr, tl.load(pending_ptr + 2))
    tl.store(snapshot_sq_ptr, tl.load(pending_ptr + 3))
    tl.store(snapshot_loss_ptr, tl.load(pending_ptr + 4))
    tl.store(lr_cap_ptr, tl.load(pending_ptr + 5))
    tl.store(good_lr_ptr, tl.load(pending_ptr + 6))
    tl.store(has_snapshot_ptr, tl.load(pending_ptr + 7) != 0)
    tl.store(searching_ptr, tl.load(pending_ptr + 8) != 0)
    tl.store(ceiling_ptr, tl.load(pending_ptr + 9))
    tl.store(rate_ptr, tl.load(pending_ptr + 10))
    if HAS_SHARES:
        tl.store(live_reference_ptr, tl.load(pending_ptr + 11))
        tl.store(live_before_ptr, tl.load(pending_ptr + 12))
        tl.store(live_closing_ptr, tl.load(pending_ptr + 13))
        tl.store(live_rolled_back_ptr, tl.load(pending_ptr + 14) != 0)
    tl.store(loss_sum_ptr, tl.full((), 0.0, tl.float64))
    if DEVICE_METER:
        tl.store(loss_steps_ptr, tl.full((), 0.0, tl.float64))
        tl.store(last_ptr, tl.full((), float("nan"), tl.float64))
        tl.store(before_last_ptr, tl.full((), float("nan"), tl.float64))


@triton.jit
def _apply_kernel(
    pending_ptr, loss_rollback_ptr, best_ptr, last_loss_ptr, snapshot_sq_ptr, snapshot_loss_ptr, lr_cap_ptr,
    good_lr_ptr, has_snapshot_ptr, searching_ptr, ceiling_ptr, rate_ptr, loss_sum_ptr, live_closing_ptr,
    live_before_ptr, live_reference_ptr, live_rolled_back_ptr, HAS_SHARES: tl.constexpr,
):  # fmt: skip
    """Under a host clock, after the commit pass: the pending state in, and the loss sum reset."""
    _write_state(
        pending_ptr, loss_rollback_ptr, best_ptr, last_loss_ptr, snapshot_sq_ptr, snapshot_loss_ptr, lr_cap_ptr,
        good_lr_ptr, has_snapshot_ptr, searching_ptr, ceiling_ptr, rate_ptr, loss_sum_ptr, loss_sum_ptr, loss_sum_ptr,
        loss_sum_ptr, live_closing_ptr, live_before_ptr, live_reference_ptr, live_rolled_back_ptr, False, HAS_SHARES,
    )  # fmt: skip


@triton.jit
def _row_sum(partials_ptr, n, row, BLOCK: tl.constexpr):
    """Row ``row`` of a row-major (4, n) float64 tensor, summed in a fixed order (one block for n = 1: the value)."""
    offsets = tl.arange(0, BLOCK)
    total = tl.sum(tl.load(partials_ptr + row * n + offsets, mask=offsets < n, other=0.0).to(tl.float64), axis=0)
    for start in range(BLOCK, n, BLOCK):
        block = tl.load(partials_ptr + row * n + start + offsets, mask=start + offsets < n, other=0.0)
        total += tl.sum(block.to(tl.float64), axis=0)
    return total


def rise_factor(tolerance: float) -> float:
    """1 + the first epoch's rise tolerance as the torch code computes it: ``torch.where`` with Python numbers
    gives the default dtype (float32), so the factor is 1 + the tolerance rounded to float32."""
    return float(1 + torch.where(torch.tensor(True), tolerance, 0.0))


class KernelPolicy(NamedTuple):
    """The control's constants, in the decision kernel's argument order (after the bounds)."""

    weight_growth: float
    loss_margin: float
    loss_growth: float
    stuck_movement_sq: float
    stuck_fraction: float
    search_growth: float
    search_limit: float
    growth_limit: float
    shrink_limit: float
    loss_brake: float
    ceiling_fraction: float
    backoff: float
    cap: float
    rise_rollback: float
    first_rise_rollback: float
    search_until: float
    dead_unit_share: float


class SafeguardKernels:
    """The decision and its application for one control (a :class:`~bbfused.control.safeguard.SafeguardControl`:
    its state tensors are read and written in place), on its device; the outputs a captured step replays are
    allocated once."""

    def __init__(
        self, control: Any, policy: KernelPolicy, first_epoch_rise: float, first_epoch_rise_after_progress: float
    ) -> None:
        self.control = control
        device = control.device
        self.pending = torch.zeros(len(PENDING), dtype=torch.float64, device=device)
        self.diverged = torch.zeros((), dtype=torch.bool, device=device)
        self.applied = torch.zeros((), dtype=torch.float64, device=device)
        self.rise_factors = (rise_factor(first_epoch_rise), rise_factor(first_epoch_rise_after_progress))
        self.policy = (*policy, DBL_MAX)

    def decide(
        self, sums: torch.Tensor, clock: EpochClock, bounds: tuple[float, float], anneal: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(diverged, the next applied rate) as device tensors. ``sums``: the pass's four sums, or its (4, n)
        per-block partials (added here). Under a device clock the decision also writes the control's state at a
        period end (no exception can stop a captured step half-way) and returns the same two tensors every call (a
        captured step replays their addresses); under a host clock new ones (the clock keeps the flags), and
        :meth:`apply` writes the state after the commit pass. ``anneal``: the end phase's factor for the next
        epoch (a host clock's; a device clock's is looked up in the control's table on the device). The dead-unit
        test reads the control's gradient shares, the closing step's already taken."""
        c = self.control
        meter = c.loss
        device_clock = isinstance(clock, DeviceClock)
        if device_clock:
            diverged, applied = self.diverged, self.applied
            table = applied if c.anneal_table is None else c.anneal_table
            clock_ptrs = (clock.epoch, clock.step, clock.epoch_gate, clock.gate, table)
            loss_steps, host = meter.steps, (0.0, 0.0, 0, 0, 1.0)
            step_offset = 0 if clock.counted else 1
        else:
            diverged = torch.empty((), dtype=torch.bool, device=c.device)
            applied = torch.empty((), dtype=torch.float64, device=c.device)
            search_open = clock.closes_inner_period if clock.periods.length else True
            host = (float(meter.steps), float(clock.closing_steps), int(clock.in_first_epoch_periods),
                    int(search_open), float(anneal))  # fmt: skip
            clock_ptrs = (applied, applied, diverged, diverged, applied)  # not read
            loss_steps, step_offset = applied, 0
        last = meter.last if meter.last.device == c.device else meter.last.to(c.device)
        before_last = meter.before_last if meter.before_last.device == c.device else meter.before_last.to(c.device)
        periods = clock.periods
        shares = self._share_tensors()
        _decide_kernel[(1,)](
            sums, sums.numel() // 4, meter.sum, loss_steps, last, before_last,
            c.rate, c.ceiling, c.snapshot_sq_norm, c.lr_cap, c.good_lr, c.initial_loss, c.best_loss, c.last_loss,
            c.snapshot_loss, c.searching, c.has_snapshot, c.loss_rollback,
            *shares,
            *clock_ptrs,
            self.pending, diverged, applied,
            *host, *self.rise_factors, float(c.weight_floor), float(bounds[0]), float(bounds[1]), *self.policy,
            periods.length, periods.last_inner_end, int(clock.steps_per_epoch or 0), int(c.epochs or 0), step_offset,
            DEVICE_CLOCK=device_clock, HAS_SHARES=c.gradient_shares is not None, BLOCK=REDUCE_BLOCK,
            **SCALAR_OPTIONS,
        )  # fmt: skip
        return diverged, applied

    def apply(self, clock: EpochClock) -> None:
        """Under a host clock, write the pending state and reset the loss meter (a device clock's decide did)."""
        if isinstance(clock, DeviceClock):
            return
        c = self.control
        meter = c.loss
        _apply_kernel[(1,)](
            self.pending, c.loss_rollback, c.best_loss, c.last_loss, c.snapshot_sq_norm, c.snapshot_loss, c.lr_cap,
            c.good_lr, c.has_snapshot, c.searching, c.ceiling, c.rate, meter.sum, *self._share_tensors(),
            HAS_SHARES=c.gradient_shares is not None,
            **SCALAR_OPTIONS,
        )  # fmt: skip
        meter.steps = 0
        meter.last = meter.no_loss
        meter.before_last = meter.no_loss

    def _share_tensors(self) -> tuple[torch.Tensor, ...]:
        """The dead-unit test's tensors: the closing step's share, the share before it, the reference, whether the
        last period was rolled back by it (without the test the rate's and a flag's tensors, not used)."""
        shares = self.control.gradient_shares
        if shares is None:
            return (*(self.control.rate,) * 3, self.control.searching)
        return shares.closing, shares.before_end, shares.reference, shares.rolled_back


__all__ = ["PENDING", "SafeguardKernels"]
