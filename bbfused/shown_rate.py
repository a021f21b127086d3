"""The learning rate the kernels apply, and how every parameter group's ``"lr"`` shows it.

The applied rate is the rate control's rate times a multiplier that is 1 until something writes the groups' ``"lr"``
(a ``torch.optim.lr_scheduler``, a user): such a write w, over the rate shown s, multiplies the multiplier by w / s,
so a scheduler scales BB's rate as it would scale a constant one (as Prodigy's and D-Adaptation's ``lr`` do), and
the groups, ``get_last_lr()`` and the logs show the rate actually applied.

Each group shows the rate as a Python float that BB writes and never reads: learning-rate monitors (Lightning's,
Hugging Face's) log ``group["lr"]`` and keep it, and a live tensor updated in place would rewrite their history.
Reading the rate synchronises with the device, so it is published only where it changes (epoch ends, loading,
construction); a write is taken over without a sync (the value written is the rate applied from then on). A
captured step cannot write a float: there the groups show the rate tensor itself, which a scheduler fills in place:
the steps apply the value written, and each period end (a step's, on the device) compares it with the rate last
published to take it into the multiplier (a value that is not a finite number >= 0 is undone there, as checking it
on the host would need a sync; it is applied to the steps before).
"""

from __future__ import annotations

from typing import Any

import torch

from .arguments import is_real
from .buffer_set import BufferSet
from .clock import EpochClock
from .diagnostics import warn


class ShownRate:
    """The control's rate (``base``, on the master device), the multiplier, and the value the groups show."""

    def __init__(self, buffers: BufferSet, clock: EpochClock, param_groups: list[dict[str, Any]]) -> None:
        self.buffers = buffers
        self.clock = clock
        self.base = buffers.lr.clone()
        self.multiplier = torch.ones((), dtype=torch.float64, device=buffers.master)
        self.value: float | torch.Tensor = clock.shown_rate(buffers.lr)
        # The rate last published, to see a write in place into the shown tensor (None: the groups show floats).
        self._published = buffers.lr.clone() if isinstance(self.value, torch.Tensor) else None
        self._warned = False
        self.show(param_groups)

    def set_base(self, rate: torch.Tensor, param_groups: list[dict[str, Any]]) -> None:
        """The control's new rate: apply it times the multiplier, and show it."""
        self.base.copy_(rate)
        torch.mul(self.base, self.multiplier, out=self.buffers.lr)  # the master's
        self.published(param_groups)

    def rate_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The control's rate, the multiplier and the applied rate (the master device's), for a kernel to write."""
        return self.base, self.multiplier, self.buffers.lr

    @property
    def published_rate(self) -> torch.Tensor | None:
        """The applied rate as last published, where the groups show the rate tensor itself (else None); a kernel
        that publishes the rate writes it too."""
        return self._published

    def published(self, param_groups: list[dict[str, Any]], remembered: bool = False) -> None:
        """The base and the master's applied rate are written (here, or by a kernel, which with ``remembered``
        wrote :attr:`published_rate` too): copy the rate to the other devices, and show it."""
        self.buffers.set_lr(self.buffers.lr)
        self.value = self.clock.shown_rate(self.buffers.lr)
        if not remembered:
            self._remember_published()
        self.show(param_groups)

    def _remember_published(self) -> None:
        if self._published is not None:
            self._published.copy_(self.buffers.lr)

    def load(self, applied: float, base: float, multiplier: float, param_groups: list[dict[str, Any]]) -> None:
        """Apply a saved rate, the control's rate and the multiplier."""
        self.multiplier.fill_(multiplier)
        self.base.fill_(base)
        self.buffers.set_lr(applied)
        self.value = self.clock.shown_rate(self.buffers.lr)
        self._remember_published()
        self.show(param_groups)

    def show(self, param_groups: list[dict[str, Any]]) -> None:
        """Put the value last published back into every group, without a sync."""
        for group in param_groups:
            group["lr"] = self.value

    def intact(self, param_groups: list[dict[str, Any]]) -> bool:
        """Whether every group's "lr" is still the object BB wrote (host-side checks only)."""
        return all(group["lr"] is self.value for group in param_groups)

    def take_writes(self, param_groups: list[dict[str, Any]]) -> None:
        """Apply what was written into the groups' "lr" since the last call as a change of the multiplier."""
        if self.intact(param_groups):
            return
        written = [group["lr"] for group in param_groups if group["lr"] is not self.value]
        values = [float(w) if isinstance(w, torch.Tensor) else w for w in written]
        if any(not is_real(v) or not v >= 0 or v == float("inf") for v in values):
            bad = next(w for w, v in zip(written, values) if not is_real(v) or not v >= 0 or v == float("inf"))
            self.show(param_groups)
            raise ValueError(
                f"param_groups[...]['lr'] was set to {bad!r}; BB takes a finite number >= 0 there, which scales its "
                f"rate (as an lr_scheduler's factor). The groups show BB's rate again"
            )
        if len(set(values)) > 1 or len(written) < len(param_groups):
            if not self._warned:
                self._warned = True
                warn(
                    f"bbfused.BB has one global learning rate, but the parameter groups' lr were set to different "
                    f"values ({sorted(set(values))}); the first one written scales every group's rate"
                )
        # The value written is the rate applied from now on: the multiplier makes the control's rate that value.
        self.multiplier.copy_(torch.as_tensor(values[0], dtype=torch.float64) / self.base)
        self.buffers.set_lr(self.base * self.multiplier)
        first = written[0]
        self.value = first if not isinstance(first, torch.Tensor) else self.clock.shown_rate(self.buffers.lr)
        self._remember_published()
        self.show(param_groups)

    def take_write_in_place(self) -> None:
        """Where the groups show the rate tensor itself: a finite value >= 0 there other than the one last published
        was written (a scheduler's ``fill_``), and the multiplier becomes what makes it the rate applied. Device ops
        (the Triton clock's finish kernel does the same)."""
        lr = self.buffers.lr
        taken = (lr != self._published) & torch.isfinite(lr) & (lr >= 0)
        self.multiplier.copy_(torch.where(taken, lr / self.base, self.multiplier))

    def settle_write_in_place(self, param_groups: list[dict[str, Any]]) -> None:
        """Take a write into the shown rate tensor now rather than at the next period end (before saving the rates)."""
        if self._published is not None:
            self.take_write_in_place()
            self.set_base(self.base, param_groups)
