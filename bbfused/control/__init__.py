"""Rate control: how an epoch's end turns into the next epoch's learning rate.

Two implementations of one interface, :class:`RateControl`, that ``BB`` drives without asking which one runs:

* :class:`~bbfused.control.paper.PaperControl` (``safeguard=False``): the paper's eq. 13 exactly.
* :class:`~bbfused.control.safeguard.SafeguardControl` (``safeguard=True``, the default): the same BB estimate,
  applied so that it cannot kill a network (its module has the rules and their constants).

Both act through an epoch clock (``bbfused.clock``) and the optimizer's buffers (``bbfused.buffer_set``), so the
same code runs host-counted and inside a captured CUDA graph.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..buffer_set import EpochBuffers
from ..checkpoint import ControlState
from ..clock import EpochClock
from .paper import PaperControl
from .safeguard import SafeguardControl


class RateControl(Protocol):
    skips_nonfinite: bool  # whether the step leaves an element whose gradient is not finite unchanged
    rolls_back: bool  # whether a diverged epoch returns to the snapshots (which must then be finite)

    def first_step(self, buffers: EpochBuffers, loss: torch.Tensor | None) -> None:
        """Before the run's first update."""

    def add_loss(self, loss: torch.Tensor) -> None:
        """This step's training loss (a 0-dim tensor on the master device)."""

    def add_params(self, numel: int, snapshot_sq_norm: torch.Tensor) -> None:
        """A group of ``numel`` values was added, its snapshot taken now (‖·‖² given)."""

    def track_buffers(self, tensors: list[torch.Tensor]) -> None:
        """Model buffers a rollback restores along with the parameters."""

    def close_epoch(
        self, buffers: EpochBuffers, lr: torch.Tensor, clock: EpochClock, taus: tuple[float, float, float]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The epoch-end passes; the next rate and whether the epoch was rolled back (None: never judged)."""

    def state(self, epoch: int) -> ControlState:
        """The state a checkpoint keeps."""

    def check_state(self, state: ControlState) -> None:
        """Raise ValueError unless ``state`` can be loaded (before anything is written)."""

    def load_state(self, state: ControlState, buffers: EpochBuffers) -> None:
        """Load a checked state."""


def make_control(safeguard: bool, clock: EpochClock, device: torch.device, numel: int) -> RateControl:
    return SafeguardControl(clock, device, numel) if safeguard else PaperControl()


__all__ = ["PaperControl", "RateControl", "SafeguardControl", "make_control"]
