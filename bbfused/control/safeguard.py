"""The default rate control (``safeguard=True``): the paper's BB estimate, applied so that it cannot kill a network.

- **bounded steps**: the next rate is the estimate clamped to [rate / 10, rate · 2] (a stabilised BB step,
  in the spirit of Tan et al.'s smoothing of SGD-BB rates) and then into the paper's bounds
  [τ_min, τ_max] / (k + 2), from epoch 1 on; an estimate that is zero, inf or NaN keeps the rate. The bounds,
  not η0, set where the rates go: a tiny η0 is left behind after epoch 0, and no fallback jumps to an
  absolute τ_0/(k + 2). An epoch whose mean loss rose above the previous one's brakes: the next rate is at
  most half its rate.
- **divergence tests** at every epoch end: a parameter or gradient average that is not finite; ‖θ‖² grown
  past 4 · max(its value at the last good epoch end, 0.0025 · number of values); with the training loss
  given to ``step``: an epoch mean or a last-step loss that is not finite, or above 2.5 times the best epoch
  mean so far and above it by more than 5 % of the initial loss (a ratio alone is noise at near-zero loss;
  the last step's loss sees damage in the epoch's last steps, which the mean hides), or, before any good
  epoch, a mean not 5 % below the first step's loss although the weights moved by more than 10 % (a rate
  so large that the network is stuck at chance; a too-small rate barely moves them).
- **rollback**: a diverged epoch is undone: parameters and the tracked model buffers (BatchNorm running
  statistics, see ``BB.track_buffers``) return to the last good epoch end; the next rate is the last good
  one, at most a quarter of the one that diverged (before any good epoch: a tenth of it, at most
  τ_max/(k + 2), so an absurd η0 is left within an epoch or two); later rates are capped at a quarter of the
  smallest rate that diverged. A second rollback in a row by the loss tests alone keeps the epoch instead and
  resets the best loss (the snapshot itself is no better: its damage came in the last steps of the epoch
  before).

Every decision is made with device tensors: closing an epoch never synchronises with the host. The constants
below are the policy; ``benchmarks/results/robustness.md`` has the measurements they were chosen by.
"""

from __future__ import annotations

import math

import torch

from ..buffer_set import EpochBuffers
from ..checkpoint import ControlState, check_model_buffers
from ..clock import EpochClock, nan
from ..rule import bb_ratio, epoch_bound

# How far one epoch may move the rate: at most doubled, at most divided by ten.
RATE_GROWTH_LIMIT = 2.0
RATE_SHRINK_LIMIT = 0.1
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

# Epoch-end sums a backend's measuring pass returns, in this order (float64).
SUMS = ("delta_sq_norm", "delta_dot_y", "param_sq_norm", "ema_sq_norm")


class SafeguardControl:
    """The default policy (see the module docstring). Its state lives on the master device and is written through
    the epoch clock, so the same decisions run host-counted or inside a captured CUDA graph."""

    skips_nonfinite = True
    rolls_back = True

    def __init__(self, clock: EpochClock, device: torch.device, numel: int) -> None:
        self.device = device
        self.numel = numel
        self.weight_floor = WEIGHT_FLOOR * numel
        # Whether prev_params / prev_ema hold a good epoch end the rule may compare with.
        self.has_snapshot = torch.tensor(False, device=device)
        self.snapshot_sq_norm = torch.zeros((), dtype=torch.float64, device=device)
        self.lr_cap = torch.tensor(math.inf, dtype=torch.float64, device=device)
        self.good_lr = nan(device)  # the rate of the last epoch that was not rolled back
        self.loss = clock.loss_meter(device)  # this epoch's losses
        self.initial_loss = nan(device)  # the first step's loss
        self.best_loss = nan(device)  # the lowest mean loss of a good epoch whose every step gave one
        self.last_loss = nan(device)  # the mean loss of the last good epoch (NaN: it did not give one each step)
        # Whether the last epoch was rolled back by a loss test alone: a second one in a row means the snapshot
        # itself is no better (its own loss is high: the damage came in the previous epoch's last steps).
        self.loss_rollback = torch.tensor(False, device=device)
        self.model_buffers: list[torch.Tensor] = []
        self.model_buffer_snapshots: list[torch.Tensor] = []

    # ------------------------------------------------------------------ model buffers
    def track_buffers(self, tensors: list[torch.Tensor]) -> None:
        """Restore these tensors (a model's buffers) along with the parameters when an epoch is rolled back; their
        values now are what a rolled-back epoch 0 returns to."""
        self.model_buffers = tensors
        self.model_buffer_snapshots = [t.detach().clone() for t in tensors]

    def _commit_model_buffers(self, rolled_back: torch.Tensor, clock: EpochClock) -> None:
        for live, snapshot in zip(self.model_buffers, self.model_buffer_snapshots):
            flag = rolled_back.to(live.device, non_blocking=live.device.type == "cuda")
            clock.commit(live, torch.where(flag, snapshot, live))
            clock.commit(snapshot, live)

    # ------------------------------------------------------------------ per step
    def first_step(self, buffers: EpochBuffers, loss: torch.Tensor | None) -> None:
        """Before the run's first update: the point a diverged epoch 0 returns to, and the initial loss."""
        buffers.snapshot_params()
        self.snapshot_sq_norm.copy_(buffers.sq_norm("prev_params"))
        # The model buffers' snapshot stays the one track_buffers() took: the first forward pass has already
        # updated BatchNorm's running statistics by now.
        if loss is not None:
            self.initial_loss.copy_(loss)

    def add_params(self, numel: int, snapshot_sq_norm: torch.Tensor) -> None:
        """``numel`` parameters were added (``BB.add_param_group``) with their snapshot taken now, whose ‖·‖² is
        ``snapshot_sq_norm``: the weight growth test compares the next epoch end's ‖θ‖², which includes them, with a
        reference and a floor that include them too (before the first step, first_step() takes the reference)."""
        self.numel += numel
        self.weight_floor = WEIGHT_FLOOR * self.numel
        self.snapshot_sq_norm.add_(snapshot_sq_norm)

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss.add(loss)

    # ------------------------------------------------------------------ epoch end
    def _epoch_loss(self, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The epoch's mean loss, whether every step gave one, the initial loss and the last step's loss; under
        torch.distributed the sums and the ranks' initial and last-step losses are all-reduced over the default
        group (one small collective, no host sync) so that every rank decides alike, as one process would."""
        totals = torch.stack(
            [
                self.loss.sum,
                self.loss.steps_tensor(),
                torch.nan_to_num(self.initial_loss),
                self.loss.last.to(self.loss.sum.dtype),
            ]
        )
        initial, last = self.initial_loss, totals[3]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            torch.distributed.all_reduce(totals)
            steps *= world
            initial = torch.where(torch.isnan(initial), initial, totals[2] / world)
            last = totals[3] / world
        return totals[0] / totals[1], totals[1] == steps, initial, last

    def diverged(
        self, sums: torch.Tensor, steps: int
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Whether the epoch that ``sums`` (:data:`SUMS`) measured diverged, whether it was a good epoch that
        raised the mean loss (bool device tensors), and the new loss references as (state tensor, new value) pairs,
        which the caller writes once the epoch end has gone through."""
        delta_sq, param_sq, ema_sq = sums[0], sums[2], sums[3]
        limit = WEIGHT_GROWTH * self.snapshot_sq_norm.clamp(min=self.weight_floor)
        # NaN fails every comparison: "not <=" catches it along with growth past the limit.
        weights_bad = ~(param_sq <= limit) | ~torch.isfinite(ema_sq)
        mean, complete, initial, last = self._epoch_loss(steps)
        best = self.best_loss
        margin = LOSS_MARGIN * torch.nan_to_num(initial, nan=0.0).clamp(min=0.0)

        def wrecked(loss: torch.Tensor) -> torch.Tensor:
            return (best > 0) & (loss > LOSS_GROWTH * best) & (loss - best > margin)

        # Before any good epoch: no progress from the first step although the weights moved.
        moved = delta_sq > STUCK_MOVEMENT**2 * self.snapshot_sq_norm
        stuck = torch.isnan(best) & (initial > 0) & (mean > (1 - STUCK_PROGRESS) * initial) & moved
        # The last step's loss sees damage done in the epoch's last steps, which the mean hides.
        loss_bad = complete & (~torch.isfinite(mean) | ~torch.isfinite(last) | stuck | wrecked(mean) | wrecked(last))
        accept_anyway = self.loss_rollback & ~weights_bad & torch.isfinite(mean) & torch.isfinite(last) & ~stuck
        diverged = weights_bad | (loss_bad & ~accept_anyway)
        good_loss = complete & ~diverged
        lower = good_loss & ~(mean >= best)  # NaN best: any mean is lower
        rose = good_loss & (mean > self.last_loss)
        references = [
            (self.loss_rollback, diverged & ~weights_bad),
            (self.best_loss, torch.where(lower | (accept_anyway & good_loss), mean, best)),
            (
                self.last_loss,
                torch.where(diverged, self.last_loss, torch.where(good_loss, mean, torch.full_like(mean, math.nan))),
            ),
            (self.snapshot_sq_norm, torch.where(diverged, self.snapshot_sq_norm, param_sq)),
        ]
        return diverged, rose, references

    def next_rate(
        self,
        sums: torch.Tensor,
        diverged: torch.Tensor,
        rose: torch.Tensor,
        lr: torch.Tensor,
        epoch: int | torch.Tensor,
        steps: int,
        taus: tuple[float, float, float],
    ) -> torch.Tensor:
        """The rate of the epoch after ``epoch`` (``rose``: its mean loss rose, so the rate may not grow)."""
        _, tau_min, tau_max = taus
        ceiling = epoch_bound(tau_max, epoch, lr)
        upper = torch.minimum(self.lr_cap, ceiling)
        estimate = bb_ratio(sums, steps)
        usable = torch.isfinite(estimate) & (estimate > 0) & self.has_snapshot & (epoch >= 1)
        estimate = torch.where(usable, estimate, lr)
        growth = torch.where(rose, torch.full_like(lr, LOSS_BRAKE), torch.full_like(lr, RATE_GROWTH_LIMIT))
        estimate = torch.minimum(torch.maximum(estimate, lr * RATE_SHRINK_LIMIT), lr * growth)
        # Epoch 0 (and a good epoch right after a rolled-back one) has no estimate: the rate stays, within bounds.
        kept = torch.minimum(torch.maximum(estimate, epoch_bound(tau_min, epoch, lr)), upper)
        backed_off = torch.where(torch.isnan(self.good_lr), lr * BACKOFF, torch.minimum(self.good_lr, lr * CAP))
        backed_off = torch.minimum(backed_off, ceiling)
        return torch.where(diverged, backed_off, kept)

    def close_epoch(
        self, buffers: EpochBuffers, lr: torch.Tensor, clock: EpochClock, taus: tuple[float, float, float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Measure, decide, commit: the next rate and whether the epoch was rolled back (device tensors).

        Repeatable after an exception: the decision writes nothing, the commit passes are copies that give the same
        result when run twice, and the control's state changes only at the end (the buffers keep the measured
        sums). Every write goes through ``clock``, which applies it only at an epoch's end."""
        sums = buffers.measure(clock)
        steps = clock.closing_steps
        diverged, rose, references = self.diverged(sums, steps)
        new_lr = self.next_rate(sums, diverged, rose, lr, clock.rule_epoch, steps, taus)
        buffers.commit(diverged, clock)
        self._commit_model_buffers(diverged, clock)
        references.append((self.lr_cap, torch.where(diverged, torch.minimum(self.lr_cap, lr * CAP), self.lr_cap)))
        references.append((self.good_lr, torch.where(diverged, self.good_lr, lr)))
        # After a rollback prev_ema holds the diverged epoch's averages: the next epoch has no estimate.
        references.append((self.has_snapshot, ~diverged))
        for state, value in references:
            clock.commit(state, value)
        self.loss.reset(clock)
        return new_lr, diverged

    # ------------------------------------------------------------------ checkpoints
    def state(self, epoch: int) -> ControlState:
        def number_or_none(t: torch.Tensor) -> float | None:
            return None if math.isnan(value := float(t)) else value

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
            model_buffers=[t.detach().cpu().clone() for t in self.model_buffer_snapshots],
        )

    def check_state(self, state: ControlState) -> None:
        check_model_buffers(state.model_buffers, self.model_buffers)

    def load_state(self, state: ControlState, buffers: EpochBuffers) -> None:
        """Load a checked state into the state tensors in place: a step captured in a CUDA graph before loading goes
        on with the loaded state."""
        self.has_snapshot.fill_(state.has_snapshot)
        self.lr_cap.fill_(state.lr_cap)
        self.loss.load(state.loss_sum, state.loss_steps)
        self.loss_rollback.fill_(state.loss_rollback)
        for number, value in (
            (self.initial_loss, state.initial_loss),
            (self.best_loss, state.best_loss),
            (self.last_loss, state.last_loss),
            (self.good_lr, state.good_lr),
        ):
            number.fill_(math.nan if value is None else value)
        # Checked against the tracked buffers already; none saved (an older state dict) keeps the current copies.
        for snapshot, value in zip(self.model_buffer_snapshots, state.model_buffers):
            snapshot.copy_(value)
        self.snapshot_sq_norm.copy_(buffers.sq_norm("prev_params"))
