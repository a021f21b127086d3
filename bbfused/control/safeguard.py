"""The default rate control (``safeguard=True``): BB's estimate, applied so that a run from any initial rate ends
where a tuned recipe ends, and so that it cannot kill a network.

The control keeps a rate r and applies r times an end-phase factor (below) times the optimizer's multiplier (an
lr_scheduler's). At the end of every rate period (an epoch; the first epoch is split into
:data:`FIRST_EPOCH_PERIODS` so that the rate moves several times within it):

- **search**: from the first estimate on, while the estimate η is at least r and the loss does not rise, r grows
  by :data:`SEARCH_GROWTH` per period, or up to η when η is larger (at most :data:`SEARCH_LIMIT`): a tiny η0 is
  left behind within the first epoch, where a bounded BB step needs one epoch per doubling. The search ends with
  the first epoch's last period (without a split first epoch it goes on): an estimate that overshoots costs a
  period of a few steps there, but a whole epoch, rolled back, after it; while a period's mean loss is still above
  :data:`SEARCH_UNTIL_PROGRESS` times the first step's loss it goes on (a start too slow to have learned anything
  has little to lose).
- **follow**: after that, r moves towards η by at most a factor 2 up or 10 down (a stabilised BB step, in the
  spirit of Tan et al.'s smoothing of SGD-BB rates), inside [:data:`LOWEST_RATE`, :data:`HIGHEST_RATE`] (or
  ``tau_min``, ``tau_max`` when given); an η that is zero, inf or NaN keeps r. A period whose mean loss rose
  (by more than :data:`FIRST_EPOCH_RISE` within the first epoch, where periods are short and noisy; a variant may
  count a rise there from another fraction once an earlier period's mean fell below the search's progress mark; a
  tolerance is a fraction of the last mean's size, so a negative mean's bound lies above it too) halves r at most,
  and r never again grows past :data:`CEILING` times the rate at which the loss rose. A rise past
  :data:`RISE_ROLLBACK` times the last good period's mean (within a split first epoch, before any period's mean
  fell below the search's progress mark: past :data:`FIRST_EPOCH_RISE_ROLLBACK` times it, the first epoch's own
  tolerance; and by more than the loss margin below) is rolled back instead, and r returns to the last good rate,
  under that ceiling (the cap of a diverged period does not apply).
- **end phase**: with the planned number of epochs N (``BB(..., epochs=N)``), the applied rate is r times a
  cosine that falls from 1 to near 0 over the second half of the run: the part of the tuned recipe (SGD with
  momentum and cosine annealing) that a rate estimate cannot give.
- **divergence tests** at every period end: a parameter or gradient average that is not finite; ‖θ‖² grown
  past 4 · max(its value at the last good period end, 0.0025 · number of values) unless the loss fell below the
  best mean (the weights of a solution far from a small initialisation grow fast too); with the training loss
  given to ``step``: a mean or last-step loss that is not finite, or a mean or closing loss (the smaller of the
  period's last two steps' losses) above 2.5 times the best period mean so far (or the loss at the snapshot, when
  higher: a rollback must return to something better) and above it by more than 5 % of the initial loss (a ratio
  alone is noise at near-zero loss; the closing loss sees damage in the period's last steps, which the mean hides,
  and not one odd batch, such as an epoch's small last one), or, before any good period, a mean not 5 %
  below the first step's loss although the weights moved by more than 10 % (a rate so large that the network is
  stuck at chance; a too-small rate barely moves them); and a period that no other test rolls back but whose last
  steps' gradients have a share of values different from zero under :data:`DEAD_UNIT_SHARE` times the share at the
  last good period end (the first step's before any): units that a too-large step killed (``live_gradients``); a
  second such period in a row is kept instead, its share the new reference.
- **rollback**: a diverged period is undone: parameters, the tracked model buffers (BatchNorm running statistics,
  see ``BB.track_buffers``) and the momentum return to the last good period end; r becomes the last good rate, at
  most a quarter of the one that diverged (before any good period: a tenth of it), and r is capped at a quarter
  of the smallest rate that diverged. A second rollback in a row by the loss tests alone keeps the period
  instead and resets the best loss (the snapshot itself is no better: its damage came in the previous period's
  last steps).

Every decision is made with device tensors: closing a period never synchronises with the host. The constants
below are the policy; ``benchmarks/results/robustness.md`` has the measurements they were chosen by.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..buffer_set import EpochBuffers
from ..checkpoint import ControlState, check_model_buffers
from ..clock import EpochClock, closing_loss, nan
from ..rule import bb_ratio
from ..tracked_buffers import TrackedBuffers
from .live_gradients import GradientShares

if TYPE_CHECKING:
    from .safeguard_kernel import SafeguardKernels

# Heavy-ball momentum unless the user sets it: every tuned recipe of the references uses it.
DEFAULT_MOMENTUM = 0.9
# The first epoch's rate periods: the search moves the rate after each.
FIRST_EPOCH_PERIODS = 4
# With momentum, g is the mean of d over the last quarter of each epoch after the first, read from the run's point at
# the quarter's two ends: the steps between leave g alone (bbfused.average_window).
AVERAGE_WINDOW = 0.25
# The search: growth per period while the estimate does not object, and at most this factor towards the estimate.
SEARCH_GROWTH = 4.0
SEARCH_LIMIT = 16.0
# The search goes on past the first epoch while a period's mean loss is above this fraction of the first step's.
SEARCH_UNTIL_PROGRESS = 0.95
# How far one period may move the rate after the search: at most doubled, at most divided by ten.
RATE_GROWTH_LIMIT = 2.0
RATE_SHRINK_LIMIT = 0.1
# The rate never grows again past this fraction of a rate at which the mean loss rose.
CEILING = 0.7
# A rise of the mean loss within a split first epoch counts past this fraction (its periods are a few steps).
FIRST_EPOCH_RISE = 0.1
# A period whose mean loss rose past this factor times the last good period's (and by more than the loss margin)
# is rolled back to the rate before it: in a short run the epoch spent recovering costs more than the redo.
RISE_ROLLBACK = 1.25
# Within a split first epoch, while no period's mean has yet fallen below the search's progress mark, a rise past the
# first epoch's tolerance is rolled back too, not only braked: a search step that overshoots there can leave the
# weights where moderate rates no longer train (a GroupNorm CNN sat at chance for four epochs after one such
# period), and the network has learned nothing a redo would lose. After progress the period's gains are kept.
FIRST_EPOCH_RISE_ROLLBACK = 1 + FIRST_EPOCH_RISE
# Bounds of the rate r when tau_min / tau_max are not given.
LOWEST_RATE = 1e-4
HIGHEST_RATE = 100.0
# After a diverged epoch with no good rate yet to return to, the next rate as a fraction of the one that diverged
# (a hundredth after non-finite values helped LeNet-5 from η0 = 10 and hurt the paper's MLP from η0 = 1 more:
# benchmarks/results/robustness.md). Later rates are capped at CAP times the smallest rate that diverged (a half
# left LeNet-5 at a rate just under the one that diverged, which trained poorly: the same report).
BACKOFF = 0.1
CAP = 0.25
# Weight growth test: the weights' RMS doubled and passed 0.05 (a start from near-zero weights is no growth).
WEIGHT_GROWTH = 4.0
WEIGHT_FLOOR = 2.5e-3
# Loss tests: the epoch's mean loss against the best epoch mean, with a margin in units of the initial loss,
# and the relative weight movement that separates "stuck at chance" from "rate too small to show progress".
LOSS_GROWTH = 2.5
LOSS_MARGIN = 0.05
STUCK_PROGRESS = 0.05
STUCK_MOVEMENT = 0.1
# An epoch whose mean loss rose above the previous good epoch's (without diverging) brakes: the next rate is at
# most this fraction of its rate, whatever the estimate says.
LOSS_BRAKE = 0.5
# Dead-unit test: a period's non-zero gradient values fell under this share of the last good period end's.
DEAD_UNIT_SHARE = 0.5

# Epoch-end sums a backend's measuring pass returns, in this order (float64).
SUMS = ("delta_sq_norm", "delta_dot_y", "param_sq_norm", "ema_sq_norm")


def anneal_factor(
    epoch: int | torch.Tensor, epochs: int | None, table: torch.Tensor | None = None
) -> float | torch.Tensor:
    """The end phase: the factor on the rate for ``epoch`` of a run of ``epochs``; 1 in the first half, then a
    cosine from 1 to 0 over the second half, each epoch at the cosine's value at its middle (what cosine annealing
    applies to it on average); an epoch past the plan keeps the last factor. None: 1.

    A device-counted epoch indexes a table of the host's factors (``table``, :func:`anneal_table`, built here when
    not given): the device's cosine may differ from the C library's in the last bit, and a captured run must apply
    the very rates a host-counted one does."""
    if epochs is None:
        return 1.0
    if isinstance(epoch, torch.Tensor):
        table = anneal_table(epochs, epoch.device) if table is None else table
        return table[epoch.to(table.device).clamp(min=0, max=epochs - 1)]
    start = max(1, epochs // 2)
    k = min(epoch, epochs - 1)
    if k < start:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (k - start + 0.5) / (epochs - start)))


def anneal_table(epochs: int, device: torch.device) -> torch.Tensor:
    """The end phase's factor of every planned epoch, computed on the host, as a float64 tensor on ``device``."""
    return torch.tensor([anneal_factor(k, epochs) for k in range(epochs)], dtype=torch.float64, device=device)


class SafeguardControl:
    """The default policy (see the module docstring). Its state lives on the master device and is written through
    the epoch clock, so the same decisions run host-counted or inside a captured CUDA graph."""

    skips_nonfinite = True
    rolls_back = True
    is_paper_method = False
    DEFAULT_MOMENTUM = DEFAULT_MOMENTUM
    FIRST_EPOCH_PERIODS = FIRST_EPOCH_PERIODS
    AVERAGE_WINDOW = AVERAGE_WINDOW
    # (tau0, tau_min, tau_max): no fallback rate; the bounds of r.
    DEFAULT_TAUS = (None, LOWEST_RATE, HIGHEST_RATE)
    # The constants a variant of the policy may set otherwise (``control.preconditioned``).
    SEARCH_GROWTH = SEARCH_GROWTH
    SEARCH_LIMIT = SEARCH_LIMIT
    RATE_GROWTH_LIMIT = RATE_GROWTH_LIMIT
    STUCK_MOVEMENT = STUCK_MOVEMENT
    FIRST_EPOCH_RISE = FIRST_EPOCH_RISE
    FIRST_EPOCH_RISE_ROLLBACK = FIRST_EPOCH_RISE_ROLLBACK
    # Once an earlier good period's mean was below SEARCH_UNTIL_PROGRESS times the first step's loss.
    FIRST_EPOCH_RISE_AFTER_PROGRESS = FIRST_EPOCH_RISE
    FIRST_RATE_LIMIT = math.inf  # the first rate is min(lr, this)
    DEAD_UNIT_SHARE = DEAD_UNIT_SHARE  # 0: no dead-unit test (and no counting)

    def __init__(self, clock: EpochClock, device: torch.device, numel: int, lr: float, epochs: int | None) -> None:
        self.device = device
        self.numel = numel
        self.epochs = epochs
        self.weight_floor = WEIGHT_FLOOR * numel
        self.rate = torch.tensor(lr, dtype=torch.float64, device=device)  # r, before the end phase
        self.searching = torch.tensor(True, device=device)
        self.ceiling = torch.tensor(math.inf, dtype=torch.float64, device=device)
        # Whether prev_params / prev_ema hold a good period end the rule may compare with.
        self.has_snapshot = torch.tensor(False, device=device)
        self.snapshot_sq_norm = torch.zeros((), dtype=torch.float64, device=device)
        self.lr_cap = torch.tensor(math.inf, dtype=torch.float64, device=device)
        self.good_lr = nan(device)  # r of the last period that was not rolled back
        self.loss = clock.loss_meter(device)  # this period's losses
        self.initial_loss = nan(device)  # the first step's loss
        self.best_loss = nan(device)  # the lowest mean loss of a good period whose every step gave one
        self.last_loss = nan(device)  # the mean loss of the last good period (NaN: it did not give one each step)
        # The closing loss of the last good period: about the loss at the snapshot a rollback returns to.
        self.snapshot_loss = nan(device)
        # Whether the last period was rolled back by a loss test alone: a second one in a row means the snapshot
        # itself is no better (its own loss is high: the damage came in the previous period's last steps).
        self.loss_rollback = torch.tensor(False, device=device)
        self.model_buffers = TrackedBuffers([])
        self.gradient_shares = GradientShares(device) if self.DEAD_UNIT_SHARE > 0 else None
        self._kernels: SafeguardKernels | None = None  # built at the first period end that uses them

    @property
    def epochs(self) -> int | None:
        """The planned number of epochs (None: no end phase)."""
        return self._epochs

    @epochs.setter
    def epochs(self, epochs: int | None) -> None:
        self._epochs = epochs
        # Built here, not at an epoch end: a captured epoch end cannot copy a table from the host.
        self.anneal_table = None if epochs is None else anneal_table(epochs, self.device)

    # ------------------------------------------------------------------ model buffers
    def track_buffers(self, tensors: list[torch.Tensor]) -> None:
        """Restore these tensors (a model's buffers) along with the parameters when an epoch is rolled back; their
        values now are what a rolled-back epoch 0 returns to."""
        self.model_buffers = TrackedBuffers(tensors)

    # ------------------------------------------------------------------ per step
    def first_step(
        self, buffers: EpochBuffers, loss: torch.Tensor | None, found_inf: torch.Tensor | None = None
    ) -> None:
        """Before the run's first update: the point a diverged epoch 0 returns to, and the initial loss."""
        buffers.snapshot_params()
        self.snapshot_sq_norm.copy_(buffers.sq_norm("prev_params"))
        # The model buffers' snapshot stays the one track_buffers() took: the first forward pass has already
        # updated BatchNorm's running statistics by now.
        if loss is not None:
            self.initial_loss.copy_(loss)
        if self.gradient_shares is not None:
            self.gradient_shares.first_step(buffers, found_inf)

    def step_taken(
        self, buffers: EpochBuffers, clock: EpochClock, closes: bool, found_inf: torch.Tensor | None = None
    ) -> None:
        """After each update, once the clock counted it (before a period end it closes)."""
        if self.gradient_shares is not None:
            self.gradient_shares.step_taken(buffers, clock, closes, found_inf)

    def add_params(self, numel: int, snapshot_sq_norm: torch.Tensor) -> None:
        """``numel`` parameters were added (``BB.add_param_group``) with their snapshot taken now, whose ‖·‖² is
        ``snapshot_sq_norm``: the weight growth test compares the next epoch end's ‖θ‖², which includes them, with a
        reference and a floor that include them too (before the first step, first_step() takes the reference). The
        dead-unit test has no reference until the next good period end: the share's denominator changed."""
        self.numel += numel
        self.weight_floor = WEIGHT_FLOOR * self.numel
        self.snapshot_sq_norm.add_(snapshot_sq_norm)
        if self.gradient_shares is not None:
            self.gradient_shares.reset()

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss.add(loss)

    # ------------------------------------------------------------------ epoch end
    def _epoch_loss(self, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The epoch's mean loss, whether every step gave one, the initial loss, the last step's loss and the loss
        the period closes at (:func:`closing_loss`); under torch.distributed the sums and the ranks' initial, last and
        closing losses are all-reduced over the default group (one small collective, no host sync) so that every
        rank decides alike, as one process would."""
        dtype = self.loss.sum.dtype
        last = self.loss.last.to(dtype)
        totals = torch.stack(
            [
                self.loss.sum,
                self.loss.steps_tensor(),
                torch.nan_to_num(self.initial_loss),
                last,
                closing_loss(last, self.loss.before_last.to(dtype)),
            ]
        )
        initial, last, closing = self.initial_loss, totals[3], totals[4]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            torch.distributed.all_reduce(totals)
            steps *= world
            initial = torch.where(torch.isnan(initial), initial, totals[2] / world)
            last, closing = totals[3] / world, totals[4] / world
        return totals[0] / totals[1], totals[1] == steps, initial, last, closing

    def diverged(
        self, sums: torch.Tensor, clock: EpochClock, live: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Whether the period that ``sums`` (:data:`SUMS`) measured diverged, whether it is rolled back for a rise
        of the mean loss alone, whether it was a good period that raised the mean loss, whether its mean loss is
        still near the first step's (bool device tensors), and the new references as (state tensor, new value)
        pairs, which the caller writes once the period end has gone through. ``live``: the period's share of
        gradient values that are not zero (:class:`GradientShares`), None without the dead-unit test."""
        delta_sq, param_sq, ema_sq = sums[0], sums[2], sums[3]
        limit = WEIGHT_GROWTH * self.snapshot_sq_norm.clamp(min=self.weight_floor)
        mean, complete, initial, last, closing = self._epoch_loss(clock.closing_steps)
        best = self.best_loss
        # Weights that grew fast while the loss fell below the best mean (the first step's loss before any good
        # period) are learning a solution far from a small initialisation, not diverging.
        reference = torch.where(torch.isnan(best), initial, best)
        learning = complete & (mean < reference)
        # NaN fails every comparison: "not <=" catches it along with growth past the limit.
        weights_bad = (~(param_sq <= limit) & ~(learning & torch.isfinite(param_sq))) | ~torch.isfinite(ema_sq)
        margin = LOSS_MARGIN * torch.nan_to_num(initial, nan=0.0).clamp(min=0.0)

        # A rollback by the loss is worth it only if the snapshot is better: measured against the best mean, or the
        # snapshot's own loss when higher (momentum can end a period at a worse point than its mean).
        compared = torch.fmax(best, self.snapshot_loss)

        def wrecked(loss: torch.Tensor) -> torch.Tensor:
            return (compared > 0) & (loss > LOSS_GROWTH * compared) & (loss - compared > margin)

        # Before any good period: no progress from the first step although the weights moved.
        moved = delta_sq > self.STUCK_MOVEMENT**2 * self.snapshot_sq_norm
        stuck = torch.isnan(best) & (initial > 0) & (mean > (1 - STUCK_PROGRESS) * initial) & moved
        # The closing loss sees damage done in the period's last steps, which the mean hides.
        loss_bad = complete & (~torch.isfinite(mean) | ~torch.isfinite(last) | stuck | wrecked(mean) | wrecked(closing))
        accept_anyway = self.loss_rollback & ~weights_bad & torch.isfinite(mean) & torch.isfinite(last) & ~stuck
        diverged = weights_bad | (loss_bad & ~accept_anyway)
        # A rise rolled back (not after a loss rollback: then the snapshot is no better).
        # A ratio of losses means something only for positive ones (as the 2.5-fold test's ``compared > 0``).
        in_first = torch.as_tensor(clock.in_first_epoch_periods, device=mean.device)
        # Progress: an earlier good period's mean fell below the search's mark (a NaN best fails the comparison); a
        # mark exists only for a positive first loss, as for ``near_start``.
        progressed = (initial > 0) & (best < SEARCH_UNTIL_PROGRESS * initial)
        rollback_factor = torch.where(
            in_first & ~progressed,
            torch.full_like(mean, self.FIRST_EPOCH_RISE_ROLLBACK),
            torch.full_like(mean, RISE_ROLLBACK),
        )
        rise_limit = rollback_factor * self.last_loss
        risen = complete & ~diverged & ~self.loss_rollback & (self.last_loss > 0) & (mean > rise_limit)
        risen = risen & (mean - self.last_loss > margin)
        diverged = diverged | risen
        if live is not None:
            # Only where no other test rolls the period back: theirs decide how the rate backs off. Then it is
            # rolled back as a non-finite average is (a NaN reference, before the first share, never fires). No
            # value at all is a stationary point reached: a network whose every unit died still has its output
            # bias's gradient.
            shares = self.gradient_shares
            fell = live < self.DEAD_UNIT_SHARE * shares.reference
            # A second fall in a row is kept (its share becomes the reference): the rollback did not bring it back.
            dead = ~diverged & fell & (live > 0) & ~shares.rolled_back
            diverged = diverged | dead
            weights_bad = weights_bad | dead
        near_start = complete & (initial > 0) & (mean > SEARCH_UNTIL_PROGRESS * initial)
        good_loss = complete & ~diverged
        lower = good_loss & ~(mean >= best)  # NaN best: any mean is lower
        nan_like = torch.full_like(mean, math.nan)
        first_epoch_rise = torch.where(progressed, self.FIRST_EPOCH_RISE_AFTER_PROGRESS, self.FIRST_EPOCH_RISE)
        factor = 1 + torch.where(in_first, first_epoch_rise, 0.0)
        # The tolerance is a fraction of the last mean's size: a negative mean's bound lies above it too.
        rise_bound = torch.where(self.last_loss > 0, self.last_loss * factor, self.last_loss * (2 - factor))
        rose = good_loss & (mean > rise_bound)
        references = [
            (self.loss_rollback, diverged & ~weights_bad),
            (self.best_loss, torch.where(lower | (accept_anyway & good_loss), mean, best)),
            (
                self.last_loss,
                torch.where(diverged, self.last_loss, torch.where(good_loss, mean, torch.full_like(mean, math.nan))),
            ),
            (self.snapshot_sq_norm, torch.where(diverged, self.snapshot_sq_norm, param_sq)),
            (self.snapshot_loss, torch.where(diverged, self.snapshot_loss, torch.where(good_loss, closing, nan_like))),
        ]
        if live is not None:
            references += self.gradient_shares.references(live, diverged, dead)
        return diverged, risen, rose, near_start, references

    def next_rate(
        self,
        sums: torch.Tensor,
        diverged: torch.Tensor,
        rose: torch.Tensor,
        steps: int | torch.Tensor,
        bounds: tuple[float, float],
        search_open: bool | torch.Tensor = True,
        risen: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next period's r, whether the search goes on, and the new ceiling (``rose``: the period's mean loss
        rose, so r may not grow; ``risen``: the period is rolled back for such a rise, r returns to the last good
        rate)."""
        risen = torch.zeros_like(diverged) if risen is None else risen
        lowest, highest = bounds
        r = self.rate
        estimate = bb_ratio(sums, steps)
        usable = torch.isfinite(estimate) & (estimate > 0) & self.has_snapshot
        searching = self.searching & ~rose & ~(usable & (estimate < r)) & ~diverged
        searching = searching & torch.as_tensor(search_open, device=r.device)
        search = torch.maximum(r * self.SEARCH_GROWTH, torch.minimum(estimate, r * self.SEARCH_LIMIT))
        growth = torch.where(rose, torch.full_like(r, LOSS_BRAKE), torch.full_like(r, self.RATE_GROWTH_LIMIT))
        follow = torch.minimum(torch.maximum(estimate, r * RATE_SHRINK_LIMIT), r * growth)
        # Without an estimate (the first period, or one right after a rollback) r stays, or brakes.
        kept = torch.where(usable, torch.where(searching, search, follow), torch.minimum(r, r * growth))
        ceiling = torch.where(rose | risen, torch.minimum(self.ceiling, r * CEILING), self.ceiling)
        kept = torch.minimum(kept, torch.where(rose, ceiling, torch.maximum(ceiling, r)))
        kept = torch.minimum(kept.clamp(min=lowest, max=highest), self.lr_cap)
        backed_off = torch.where(torch.isnan(self.good_lr), r * BACKOFF, torch.minimum(self.good_lr, r * CAP))
        rise_rate = torch.minimum(torch.where(torch.isnan(self.good_lr), r * LOSS_BRAKE, self.good_lr), ceiling)
        backed_off = torch.where(risen, rise_rate, backed_off)
        return torch.where(diverged, backed_off.clamp(max=highest), kept), searching, ceiling

    def close_epoch(
        self, buffers: EpochBuffers, base: torch.Tensor, clock: EpochClock, taus: tuple[float | None, float, float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Measure, decide, commit: the next applied rate (r times the end phase's factor) and whether the period
        was rolled back (device tensors).

        Repeatable after an exception: the decision writes nothing, the commit passes are copies that give the same
        result when run twice, and the control's state changes only at the end (the buffers keep the measured
        sums). Every write goes through ``clock``, which applies it only at a period's end."""
        kernels = self._decision_kernels(buffers)
        sums = buffers.measure(clock, partials=kernels is not None)
        if kernels is not None:
            anneal = 1.0 if clock.gate is not None else float(anneal_factor(clock.next_epoch, self.epochs))
            diverged, applied = kernels.decide(sums, clock, taus[1:], anneal)
            buffers.commit(diverged, clock)
            self.model_buffers.commit(diverged, clock.gate, buffers.backends)
            kernels.apply(clock)
            return applied, diverged
        live = None if self.gradient_shares is None else self.gradient_shares.live()
        diverged, risen, rose, near_start, references = self.diverged(sums, clock, live)
        # With a split first epoch the search ends with it: one full epoch at an overshooting estimate costs a short
        # run more than the climb it saves; but not while the loss has barely left the first step's.
        search_open = torch.as_tensor(clock.closes_inner_period if clock.periods.length else True, device=self.device)
        search_open = search_open | near_start
        new_rate, searching, ceiling = self.next_rate(
            sums, diverged, rose, clock.closing_steps, taus[1:], search_open, risen
        )
        buffers.commit(diverged, clock)
        self.model_buffers.commit(diverged, clock.gate, buffers.backends)
        r = self.rate
        capped = diverged & ~risen  # a rise rolled back does not cap the rate for good
        references.append((self.lr_cap, torch.where(capped, torch.minimum(self.lr_cap, r * CAP), self.lr_cap)))
        references.append((self.good_lr, torch.where(diverged, self.good_lr, r)))
        # After a rollback prev_ema holds the diverged period's averages: the next period has no estimate.
        references.append((self.has_snapshot, ~diverged))
        references.append((self.searching, searching))
        references.append((self.ceiling, ceiling))
        references.append((self.rate, new_rate))
        for state, value in references:
            clock.commit(state, value)
        self.loss.reset(clock)
        return new_rate * anneal_factor(clock.next_epoch, self.epochs, self.anneal_table), diverged

    def _decision_kernels(self, buffers: EpochBuffers) -> SafeguardKernels | None:
        """The decision as two Triton launches (``safeguard_kernel``) where every buffer runs on the Triton backend
        on this control's device, in one process (under torch.distributed the loss sums are all-reduced between the
        decision's steps); None: the torch ops below."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed or buffers.kernel_device() != self.device:
            return None
        if self._kernels is None:
            from .safeguard_kernel import KernelPolicy, SafeguardKernels

            policy = KernelPolicy(
                WEIGHT_GROWTH, LOSS_MARGIN, LOSS_GROWTH, self.STUCK_MOVEMENT**2, 1 - STUCK_PROGRESS,
                self.SEARCH_GROWTH, self.SEARCH_LIMIT, self.RATE_GROWTH_LIMIT, RATE_SHRINK_LIMIT, LOSS_BRAKE, CEILING,
                BACKOFF, CAP, RISE_ROLLBACK, self.FIRST_EPOCH_RISE_ROLLBACK, SEARCH_UNTIL_PROGRESS,
                self.DEAD_UNIT_SHARE,
            )  # fmt: skip
            self._kernels = SafeguardKernels(self, policy, self.FIRST_EPOCH_RISE, self.FIRST_EPOCH_RISE_AFTER_PROGRESS)
        return self._kernels

    # ------------------------------------------------------------------ checkpoints
    def state(self, epoch: int) -> ControlState:
        def number_or_none(t: torch.Tensor) -> float | None:
            return None if math.isnan(value := float(t)) else value

        shares = {}  # without the test: ControlState's defaults
        if self.gradient_shares is not None:
            reference, before, rolled_back = self.gradient_shares.state()
            shares = dict(live_reference=reference, live_before=before, live_rolled_back=rolled_back)
        return ControlState(
            has_snapshot=bool(self.has_snapshot),
            lr_cap=float(self.lr_cap),
            loss_sum=float(self.loss.sum),
            loss_steps=int(self.loss.steps_tensor()),
            initial_loss=number_or_none(self.initial_loss),
            best_loss=number_or_none(self.best_loss),
            last_loss=number_or_none(self.last_loss),
            good_lr=number_or_none(self.good_lr),
            loss_rollback=bool(self.loss_rollback),
            model_buffers=[t.detach().cpu().clone() for t in self.model_buffers.snapshot_views()],
            rate=float(self.rate),
            searching=bool(self.searching),
            ceiling=float(self.ceiling),
            snapshot_loss=number_or_none(self.snapshot_loss),
            **shares,
        )

    def check_state(self, state: ControlState) -> None:
        check_model_buffers(state.model_buffers, self.model_buffers.live)

    def replanned_rate(self, epoch: int) -> float | None:
        return float(self.rate) * anneal_factor(epoch, self.epochs)

    def load_state(self, state: ControlState, buffers: EpochBuffers) -> None:
        """Load a checked state into the state tensors in place: a step captured in a CUDA graph before loading goes
        on with the loaded state."""
        self.has_snapshot.fill_(state.has_snapshot)
        self.lr_cap.fill_(state.lr_cap)
        self.loss.load(state.loss_sum, state.loss_steps)
        self.loss_rollback.fill_(state.loss_rollback)
        self.rate.fill_(state.rate)
        self.searching.fill_(state.searching)
        self.ceiling.fill_(state.ceiling)
        for number, value in (
            (self.initial_loss, state.initial_loss),
            (self.best_loss, state.best_loss),
            (self.last_loss, state.last_loss),
            (self.good_lr, state.good_lr),
            (self.snapshot_loss, state.snapshot_loss),
        ):
            number.fill_(math.nan if value is None else value)
        if self.gradient_shares is not None:
            self.gradient_shares.load(state.live_reference, state.live_before, state.live_rolled_back)
        # Checked against the tracked buffers already; none saved (an older state dict) keeps the current copies.
        if state.model_buffers:
            self.model_buffers.load_snapshots(state.model_buffers)
        self.snapshot_sq_norm.copy_(buffers.sq_norm("prev_params"))
