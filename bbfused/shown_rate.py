"""The learning rate BB shows in every parameter group's ``"lr"``.

BB has one global rate and sets it itself. Each group shows it as a Python float that BB writes and never reads:
learning-rate monitors (Lightning's, Hugging Face's) log ``group["lr"]`` and keep it, and a live tensor updated in
place would rewrite their history (and warns when they copy it). Reading the rate synchronises with the device, so
it is published only where it changes (epoch ends, loading, construction), never in a step. A captured step cannot
write a float: there the groups show the rate tensor itself. A scheduler (or a user) writing ``group["lr"]``
changes nothing: one warning, and the groups show BB's rate again.
"""

from __future__ import annotations

from typing import Any

import torch

from .clock import EpochClock
from .diagnostics import warn


class ShownRate:
    def __init__(self, value: float | torch.Tensor) -> None:
        self.value = value
        self._warned = False

    def publish(self, lr: torch.Tensor, clock: EpochClock, param_groups: list[dict[str, Any]]) -> None:
        """Show ``lr`` (the rate tensor) in every group."""
        self.value = clock.shown_rate(lr)
        self.show(param_groups)

    def show(self, param_groups: list[dict[str, Any]]) -> None:
        """Put the value last published back into every group, without a sync."""
        for group in param_groups:
            group["lr"] = self.value

    def intact(self, param_groups: list[dict[str, Any]]) -> bool:
        """Whether every group's "lr" is still the object BB wrote (host-side checks only)."""
        return all(group["lr"] is self.value for group in param_groups)

    def restore(self, param_groups: list[dict[str, Any]]) -> None:
        """Undo writes to the groups' "lr" since the last call, with one warning in the optimizer's life."""
        if self.intact(param_groups):
            return
        if not self._warned:
            self._warned = True
            warn(
                "bbfused.BB sets one global learning rate itself: a change to param_groups[...]['lr'] (for "
                "example by a torch.optim.lr_scheduler) is ignored, and the groups show BB's rate again. "
                "Remove the scheduler. This warning is shown once."
            )
        self.show(param_groups)
