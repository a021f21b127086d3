"""The learning-rate schedules of the baseline optimizers (``--lr-schedule``).

A schedule sets every group's rate at the start of each epoch from the epoch's index and the planned number of
epochs alone, so a resumed run needs no saved scheduler state, and a resume with a new ``--epochs`` replans the
rest of the run, as BB's own plan does. ``cosine`` is the closed form of torch's
``CosineAnnealingLR(optimizer, T_max=epochs)`` stepped once per epoch: the tuned recipe BB is compared with.
BB sets its own rate (and anneals it over the planned epochs), so it takes no schedule.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the command line reads SCHEDULES without loading torch
    import torch

SCHEDULES = ("constant", "cosine")
DEFAULT_SCHEDULE = "constant"


def scheduled_rate(schedule: str, initial_rate: float, epoch: int, epochs: int) -> float:
    """The rate of epoch ``epoch`` (0-based) of ``epochs`` under ``schedule``, starting from ``initial_rate``."""
    if schedule == "constant":
        return initial_rate
    if schedule == "cosine":
        return initial_rate * (1 + math.cos(math.pi * epoch / epochs)) / 2
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def apply_schedule(
    optimizer: torch.optim.Optimizer, schedule: str, initial_rate: float, epoch: int, epochs: int
) -> None:
    """Set every parameter group's ``lr`` to the schedule's rate for epoch ``epoch``."""
    rate = scheduled_rate(schedule, initial_rate, epoch, epochs)
    for group in optimizer.param_groups:
        group["lr"] = rate
