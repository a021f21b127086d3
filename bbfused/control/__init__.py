"""Rate control: how an epoch's end turns into the next epoch's learning rate.

Two implementations of one interface, :class:`RateControl`, that ``BB`` drives without asking which one runs:

* :class:`~bbfused.control.paper.PaperControl` (``safeguard=False``): the paper's eq. 13 exactly.
* :class:`~bbfused.control.safeguard.SafeguardControl` (``safeguard=True``, the default): the same BB estimate,
  applied so that it cannot kill a network (its module has the rules and their constants).
* :class:`~bbfused.control.preconditioned.PreconditionedControl` (``preconditioner="adam"``): the safeguard with the
  constants of an Adam-scaled step.

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
from .preconditioned import PreconditionedControl
from .safeguard import SafeguardControl


class RateControl(Protocol):
    skips_nonfinite: bool  # whether the step leaves an element whose gradient is not finite unchanged
    rolls_back: bool  # whether a diverged epoch returns to the snapshots (which must then be finite)
    is_paper_method: bool  # the paper's rule exactly (safeguard=False), which a checkpoint records
    DEFAULT_MOMENTUM: float
    FIRST_EPOCH_PERIODS: int  # how many rate periods the first epoch is split into
    DEFAULT_TAUS: tuple[float | None, float, float]  # tau0 (None: not used), tau_min, tau_max
    FIRST_RATE_LIMIT: float  # the first rate is min(lr, this)
    AVERAGE_WINDOW: float | None  # with momentum, g averages only this last part of each epoch (None: all of it)

    def __init__(self, clock: EpochClock, device: torch.device, numel: int, lr: float, epochs: int | None) -> None:
        """``lr``: the initial rate; ``epochs``: the planned number of epochs (None: not known)."""

    def first_step(
        self, buffers: EpochBuffers, loss: torch.Tensor | None, found_inf: torch.Tensor | None = None
    ) -> None:
        """Before the run's first update (``found_inf``: GradScaler's, when it wraps the step)."""

    def step_taken(
        self, buffers: EpochBuffers, clock: EpochClock, closes: bool, found_inf: torch.Tensor | None = None
    ) -> None:
        """After each update, once the clock counted it (``closes``: a host clock closes a period now, after this
        call)."""

    def add_loss(self, loss: torch.Tensor) -> None:
        """This step's training loss (a 0-dim tensor on the master device)."""

    def add_params(self, numel: int, snapshot_sq_norm: torch.Tensor) -> None:
        """A group of ``numel`` values was added, its snapshot taken now (‖·‖² given)."""

    def track_buffers(self, tensors: list[torch.Tensor]) -> None:
        """Model buffers a rollback restores along with the parameters."""

    def close_epoch(
        self, buffers: EpochBuffers, base: torch.Tensor, clock: EpochClock, taus: tuple[float | None, float, float]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A period's end: the passes, the next rate (before the optimizer's multiplier; ``base`` is the current
        one) and whether the period was rolled back (None: never judged)."""

    def state(self, epoch: int) -> ControlState:
        """The state a checkpoint keeps."""

    def check_state(self, state: ControlState) -> None:
        """Raise ValueError unless ``state`` can be loaded (before anything is written)."""

    def load_state(self, state: ControlState, buffers: EpochBuffers) -> None:
        """Load a checked state."""

    def replanned_rate(self, epoch: int) -> float | None:
        """After a load whose planned ``epochs`` differ from the saved run's: the rate for ``epoch`` under the new
        plan (before the optimizer's multiplier); None: the plan does not change the rate."""


def resolve_taus(
    kind: type[RateControl], taus: tuple[float | None, float | None, float | None]
) -> tuple[float | None, float, float]:
    """The taus given, the control's defaults for the others; raises for a tau0 the default control has no use
    for."""
    if taus[0] is not None and kind.DEFAULT_TAUS[0] is None:
        raise ValueError(
            "tau0 is the paper's fallback rate (safeguard=False); the default rate control has none. Drop tau0, or "
            "pass safeguard=False for the paper's method"
        )
    resolved = tuple(default if given is None else given for given, default in zip(taus, kind.DEFAULT_TAUS))
    if resolved[1] > resolved[2]:
        mode = "the default control's" if kind.DEFAULT_TAUS[0] is None else "the paper's"
        default = "tau_max" if taus[1] is not None else "tau_min"
        raise ValueError(
            f"tau_min ({resolved[1]:g}) must be <= tau_max ({resolved[2]:g}), {mode} default {default}: pass "
            f"{default} too, or a bound on the right side of it"
        )
    return resolved


def control_class(safeguard: bool, preconditioner: str | None = None) -> type[RateControl]:
    """The implementation; its class attributes are its defaults (DEFAULT_MOMENTUM, DEFAULT_TAUS,
    FIRST_EPOCH_PERIODS, FIRST_RATE_LIMIT). The paper's method has an SGD step only (checked with the arguments)."""
    if not safeguard:
        return PaperControl
    return SafeguardControl if preconditioner is None else PreconditionedControl


__all__ = [
    "PaperControl",
    "PreconditionedControl",
    "RateControl",
    "SafeguardControl",
    "control_class",
    "resolve_taus",
]
