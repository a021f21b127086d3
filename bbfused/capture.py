"""Epoch bookkeeping on the device, for a training step captured in a CUDA graph (``BB(capturable=True)``).

A graph replays kernels, not Python: the step count, the epoch count and the histories that ``BB`` otherwise
keeps on the host would stay frozen at their values during capture. Here they are device tensors updated in
place by the captured step itself; the host reads them (one sync) only when asked, e.g. by ``state_dict()``.
"""

from __future__ import annotations

import math

import torch

# Epochs the device-side histories hold (64 Ki epochs: 576 KiB per device, allocated once).
HISTORY_CAPACITY = 1 << 16


class DeviceEpochs:
    """The step within the epoch, the epoch, and per epoch its rate and whether it was rolled back."""

    def __init__(self, device: torch.device) -> None:
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.epoch = torch.zeros((), dtype=torch.int64, device=device)
        self.lr_history = torch.full((HISTORY_CAPACITY,), math.nan, dtype=torch.float64, device=device)
        self.rolled_back = torch.zeros(HISTORY_CAPACITY, dtype=torch.bool, device=device)

    def advance(self, steps_per_epoch: int) -> torch.Tensor:
        """Count a step; whether it was the epoch's last (a bool device tensor)."""
        self.step.add_(1)
        return self.step == steps_per_epoch

    def close(self, at_end: torch.Tensor, lr: torch.Tensor, rolled_back: torch.Tensor | None) -> None:
        """Where ``at_end``: record the closing epoch's rate and rollback, start the next epoch."""
        index = self.epoch.clamp(max=HISTORY_CAPACITY - 1).reshape(1)
        self.lr_history.index_put_((index,), torch.where(at_end, lr, self.lr_history.index_select(0, index)))
        if rolled_back is not None:
            self.rolled_back.index_put_((index,), rolled_back & at_end | self.rolled_back.index_select(0, index))
        self.epoch.add_(at_end.to(torch.int64))
        self.step.masked_fill_(at_end, 0)

    def read(self) -> tuple[int, int, list[torch.Tensor], list[torch.Tensor]]:
        """The host's view (one sync): epoch, step in epoch, each completed epoch's rate and rollback flag."""
        epoch, step = int(self.epoch), int(self.step)
        if epoch > HISTORY_CAPACITY:
            raise RuntimeError(
                f"BB(capturable=True) records the rates of at most {HISTORY_CAPACITY} epochs on the device and this "
                f"run has {epoch}: its history is lost. Runs that long need capturable=False (or a state dict saved "
                f"before epoch {HISTORY_CAPACITY}, loaded into a capturable=False optimizer)"
            )
        return epoch, step, list(self.lr_history[:epoch].unbind()), list(self.rolled_back[:epoch].unbind())

    def load(self, epoch: int, step: int, lr_history: list[float], rolled_back: list[int]) -> None:
        """Set from a checkpoint's values (``rolled_back``: the rolled-back epochs' indices)."""
        if epoch > HISTORY_CAPACITY:
            raise ValueError(
                f"the state dict has {epoch} epochs; BB(capturable=True) keeps at most {HISTORY_CAPACITY} on the "
                f"device: resume it with capturable=False"
            )
        self.epoch.fill_(epoch)
        self.step.fill_(step)
        self.lr_history.fill_(math.nan)
        self.lr_history[:epoch] = torch.tensor(lr_history, dtype=torch.float64)
        self.rolled_back.zero_()
        if rolled_back:
            self.rolled_back[torch.tensor(rolled_back, dtype=torch.int64)] = True
