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
    is_paper_method = True
    DEFAULT_MOMENTUM = 0.0  # the paper's SGD has none
    FIRST_EPOCH_PERIODS = 1
    DEFAULT_TAUS = (1.0, 0.1, 10.0)  # the paper's deep-network setting
    FIRST_RATE_LIMIT = float("inf")  # the paper starts at lr as given
    AVERAGE_WINDOW = None  # the paper's g averages every step

    def __init__(self, clock: EpochClock, device: torch.device, numel: int, lr: float, epochs: int | None) -> None:
        """The paper's method has no state of its own and no end phase (``epochs`` is not used)."""

    def first_step(
        self, buffers: EpochBuffers, loss: torch.Tensor | None, found_inf: torch.Tensor | None = None
    ) -> None:
        pass

    def step_taken(
        self, buffers: EpochBuffers, clock: EpochClock, closes: bool, found_inf: torch.Tensor | None = None
    ) -> None:
        pass

    def add_loss(self, loss: torch.Tensor) -> None:
        pass

    def add_params(self, numel: int, snapshot_sq_norm: torch.Tensor) -> None:
        pass

    def track_buffers(self, tensors: list[torch.Tensor]) -> None:
        pass

    def close_epoch(
        self, buffers: EpochBuffers, base: torch.Tensor, clock: EpochClock, taus: tuple[float, float, float]
    ) -> tuple[torch.Tensor, None]:
        """The single epoch-end pass; eq. 13's rate, or the same rate after epoch 0 (η̂_1 = η̂_0)."""
        sums = buffers.paper_pass(clock)
        epoch = clock.rule_epoch
        rate = bb_learning_rate(sums, clock.closing_steps, epoch, *taus)
        return choose(clock.reached(1), rate, base), None

    def state(self, epoch: int) -> ControlState:
        return ControlState.empty(epoch)

    def check_state(self, state: ControlState) -> None:
        pass

    def load_state(self, state: ControlState, buffers: EpochBuffers) -> None:
        pass

    def replanned_rate(self, epoch: int) -> float | None:
        return None  # the paper has no end phase
