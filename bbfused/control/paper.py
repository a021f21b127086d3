"""``safeguard=False``: the paper's rate, η̂_{k+1} by eq. 13 from the end of epoch 1 on; nothing is checked or
rolled back."""

from __future__ import annotations

import torch

from ..buffer_set import EpochBuffers
from ..checkpoint import ControlState
from ..clock import EpochClock, choose
from ..rule import bb_learning_rate


class PaperControl:
    skips_nonfinite = False
    rolls_back = False

    def first_step(self, buffers: EpochBuffers, loss: torch.Tensor | None) -> None:
        pass

    def add_loss(self, loss: torch.Tensor) -> None:
        pass

    def add_params(self, numel: int, snapshot_sq_norm: torch.Tensor) -> None:
        pass

    def track_buffers(self, tensors: list[torch.Tensor]) -> None:
        pass

    def close_epoch(
        self, buffers: EpochBuffers, lr: torch.Tensor, clock: EpochClock, taus: tuple[float, float, float]
    ) -> tuple[torch.Tensor, None]:
        """The single epoch-end pass; eq. 13's rate, or the same rate after epoch 0 (η̂_1 = η̂_0)."""
        sums = buffers.paper_pass(clock)
        epoch = clock.rule_epoch
        rate = bb_learning_rate(sums, clock.closing_steps, epoch, *taus)
        return choose(clock.reached(1), rate, lr), None

    def state(self, epoch: int) -> ControlState:
        return ControlState.empty(epoch)

    def check_state(self, state: ControlState) -> None:
        pass

    def load_state(self, state: ControlState, buffers: EpochBuffers) -> None:
        pass
