"""The step's preconditioner: ``BB(preconditioner="adam")`` divides each element's step by the root of its squared
gradient's running average, as Adam does, and BB's rule then sets the rate of that step.

BB's estimate for a preconditioned step is taken in the preconditioner's metric D = √v̂ + ε: the rule's ‖Δθ‖²
becomes ΔθᵀDΔθ (the measuring pass sums it in place of ‖Δθ‖²), which is BB's rule for gradient descent in the
coordinates D^½θ, where the preconditioned step is plain gradient descent. The gradient average y stays the raw
gradient's. Why and how it was measured: ``benchmarks/results/2026-12-05_cpu_preconditioned_prototype.md``.

This module holds the preconditioner's constants and its one piece of global state, the bias correction
1 − β₂ᵗ of each device; the buffers hold v (``FlatBuffer.second_moment``) and the backends the arithmetic
(``bbfused.backends.base.Backend.step``).
"""

from __future__ import annotations

from typing import Any

import torch

from .devices import on

NAMES = (None, "adam")
# Adam's defaults (Kingma & Ba; torch.optim.Adam): the squared gradient's EMA factor and the denominator's floor.
BETA2 = 0.999
EPS = 1e-8


def check_preconditioner(value: Any) -> str | None:
    """``value`` if it names a preconditioner, else ValueError naming the choices."""
    if value not in NAMES:
        raise ValueError(
            f"preconditioner must be None (BB's SGD step) or 'adam' (Adam's per-element scaling), got {value!r}"
        )
    return value


class BiasCorrection:
    """1 − β₂ᵗ for each parameter group on each of its devices, t the steps the group's second moments have taken.

    The constructor's groups start together and share one count (their buffers may step in one launch); a group
    added later (``BB.add_param_group``) counts from its own first step, so that its first steps are Adam's first
    steps (a count it did not take would leave its zero second moment uncorrected, and the step ~30x too large).
    Kept as β₂ᵗ in a float64 0-dim tensor per device, multiplied by β₂ once a step on the device (no host sync, so
    a CUDA graph can capture it); a step GradScaler skips does not count, as in torch's fused Adam. Checkpoints save
    β₂ᵗ itself, so a resumed run continues with the same bits."""

    def __init__(self) -> None:
        self.devices: list[torch.device] = []
        # One count per entry: entry 0 is the constructor's groups', each added group has its own.
        self.powers: list[dict[torch.device, torch.Tensor]] = []  # β₂ᵗ
        self.corrections: list[dict[torch.device, torch.Tensor]] = []  # 1 − β₂ᵗ
        self.entry_of_group: list[int] = []

    def add_device(self, device: torch.device) -> None:
        self.devices.append(device)
        for powers, corrections in zip(self.powers, self.corrections):
            value = float(next(iter(powers.values())))
            powers[device] = torch.tensor(value, dtype=torch.float64, device=device)
            corrections[device] = torch.tensor(1.0 - value, dtype=torch.float64, device=device)

    def add_group(self, constructor: bool) -> None:
        """The next group: one of the constructor's (sharing their count) or one added later (a count of its own)."""
        if not constructor or not self.powers:
            self.powers.append({d: torch.ones((), dtype=torch.float64, device=d) for d in self.devices})
            self.corrections.append({d: torch.zeros((), dtype=torch.float64, device=d) for d in self.devices})
        self.entry_of_group.append(0 if constructor else len(self.powers) - 1)

    def correction(self, group_index: int, device: torch.device) -> torch.Tensor:
        """1 − β₂ᵗ of group ``group_index`` on ``device`` (a float64 0-dim tensor, updated in place)."""
        return self.corrections[self.entry_of_group[group_index]][device]

    def group_powers(self) -> list[float]:
        """β₂ᵗ of every group, in group order (reading them synchronises)."""
        return [float(next(iter(self.powers[entry].values()))) for entry in self.entry_of_group]

    def advance(self, found_inf: torch.Tensor | None) -> None:
        """One more step (unless ``found_inf`` is set): β₂ᵗ ← β₂ᵗ·β₂ and the correction with it."""
        for powers, corrections in zip(self.powers, self.corrections):
            for device, power in powers.items():
                if found_inf is None:
                    power.mul_(BETA2)
                else:
                    torch.where(on(found_inf, device).reshape(()) != 0, power, power * BETA2, out=power)
                _correct(power, corrections[device])

    def check_powers(self, powers: list[float]) -> None:
        """Raise ValueError unless ``powers`` (per group, from a checkpoint) fit these groups: the constructor's
        groups share one count, so their saved powers must agree."""
        if len(powers) != len(self.entry_of_group):
            raise ValueError(
                f"corrupt state dict: beta2_powers lists {len(powers)} parameter groups, this optimizer has "
                f"{len(self.entry_of_group)}"
            )
        shared = {power for power, entry in zip(powers, self.entry_of_group) if entry == 0}
        if len(shared) > 1:
            raise ValueError(
                f"corrupt state dict: the constructor's parameter groups step together, but their beta2_powers differ "
                f"({sorted(shared)}); load a state dict as BB.state_dict() saved it"
            )

    def load(self, powers: list[float]) -> None:
        """Set each group's β₂ᵗ (checked by :meth:`check_powers`), in place."""
        for power, entry in zip(powers, self.entry_of_group):
            for device, tensor in self.powers[entry].items():
                tensor.fill_(power)
                _correct(tensor, self.corrections[entry][device])


def _correct(power: torch.Tensor, correction: torch.Tensor) -> None:
    """correction ← 1 − power, as 1 + (−power): the same bits, written in place (a captured step allocates nothing)."""
    torch.mul(power, -1.0, out=correction)
    correction.add_(1.0)
