"""The learning-rate schedules of the baseline optimizers (``--lr-schedule``).

A schedule sets every group's rate at the start of each epoch from the epoch's index and the planned number of
epochs alone, so a resumed run needs no saved scheduler state, and a resume with a new ``--epochs`` replans the
rest of the run, as BB's own plan does. ``cosine`` is the closed form of torch's
``CosineAnnealingLR(optimizer, T_max=epochs)`` stepped once per epoch: the tuned recipe BB is compared with.
``step`` divides the rate by 10 at a third and at two thirds of the epochs, torchvision's ImageNet ResNet recipe
(divided by 10 at epochs 30 and 60 of 90) for any length: torch's ``MultiStepLR(milestones=[ceil(epochs/3),
ceil(2*epochs/3)], gamma=0.1)`` stepped once per epoch.
``--warmup-epochs K`` runs the first K epochs at (e + 1)/(K + 1) of the rate (torch's ``LinearLR(start_factor=
1/(K+1), total_iters=K)``) and the schedule over the remaining epochs after them (``SequentialLR`` with milestone
K), the gradual warmup large-batch ImageNet recipes use, one step an epoch as timm's epoch-wise warmup.
BB sets its own rate (and anneals it over the planned epochs), so it takes no schedule.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the command line reads SCHEDULES without loading torch
    import torch

SCHEDULES = ("constant", "cosine", "step")
# The step schedule: this many equal stages of the planned epochs, each 1/STEP_FACTOR of the last one's rate.
STEP_STAGES = 3
STEP_FACTOR = 10
DEFAULT_SCHEDULE = "constant"


def scheduled_rate(schedule: str, initial_rate: float, epoch: int, epochs: int, warmup_epochs: int = 0) -> float:
    """The rate of epoch ``epoch`` (0-based) of ``epochs`` under ``schedule``, starting from ``initial_rate``,
    after a linear warmup over the first ``warmup_epochs`` (fewer than ``epochs``)."""
    check_warmup(warmup_epochs, epochs)
    if epoch < warmup_epochs:
        return initial_rate * (epoch + 1) / (warmup_epochs + 1)
    epoch, epochs = epoch - warmup_epochs, epochs - warmup_epochs
    if schedule == "constant":
        return initial_rate
    if schedule == "cosine":
        return initial_rate * (1 + math.cos(math.pi * epoch / epochs)) / 2
    if schedule == "step":
        return initial_rate / STEP_FACTOR ** sum(epoch >= milestone for milestone in step_milestones(epochs))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def describe_schedule(schedule: str, epochs: int, warmup_epochs: int = 0) -> str:
    """The schedule in the run's first line; empty for a constant rate without warmup."""
    check_warmup(warmup_epochs, epochs)
    parts = [f"linear warmup over {warmup_epochs} epoch{'s' if warmup_epochs > 1 else ''}"] if warmup_epochs else []
    rest = epochs - warmup_epochs
    if schedule == "cosine":
        parts.append(f"cosine annealing to 0 over {rest} epoch{'s' if rest > 1 else ''}")
    if schedule == "step" and (drops := step_milestones(rest)):
        # A 0-based epoch where the rate drops is the 1-based epoch after which it drops.
        after = " and ".join(str(warmup_epochs + epoch) for epoch in drops)
        parts.append(f"divided by {STEP_FACTOR} after epoch{'s' if len(drops) > 1 else ''} {after} of {epochs}")
    return ", then ".join(parts)


def check_warmup(warmup_epochs: int, epochs: int) -> None:
    """Raise ValueError unless ``warmup_epochs`` leaves at least one epoch of the schedule."""
    if not 0 <= warmup_epochs < epochs:
        raise ValueError(
            f"a warmup of {warmup_epochs} epochs needs at least {warmup_epochs + 1} epochs, not {epochs}: the "
            f"schedule starts after it"
        )


def step_milestones(epochs: int) -> list[int]:
    """The 0-based epochs at which the step schedule divides the rate: ``MultiStepLR``'s milestones."""
    return sorted({-(-stage * epochs // STEP_STAGES) for stage in range(1, STEP_STAGES)} - {epochs})


def apply_schedule(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    initial_rate: float,
    epoch: int,
    epochs: int,
    warmup_epochs: int = 0,
) -> None:
    """Set every parameter group's ``lr`` to the schedule's rate for epoch ``epoch``."""
    rate = scheduled_rate(schedule, initial_rate, epoch, epochs, warmup_epochs)
    for group in optimizer.param_groups:
        group["lr"] = rate
