"""The step's preconditioner: ``BB(preconditioner="adam")`` divides each element's step by the root of its squared
gradient's running average, as Adam does, and BB's rule then sets the rate of that step.

BB's estimate for a preconditioned step is taken in the preconditioner's metric D = √v̂ + ε: the rule's ‖Δθ‖²
becomes ΔθᵀDΔθ (the measuring pass sums it in place of ‖Δθ‖²), which is BB's rule for gradient descent in the
coordinates D^½θ, where the preconditioned step is plain gradient descent. The gradient average y stays the raw
gradient's. Why and how it was measured: ``benchmarks/results/2026-12-05_cpu_preconditioned_prototype.md``.

The buffer set drives one :class:`StepScaling` without asking which: :class:`NoScaling` (BB's SGD step) or
:class:`AdamScaling`, which holds the constants and the scaling's global state: each group's bias correction
1 − β₂ᵗ on each device and each parameter's lag (below). The buffers hold v (``FlatBuffer.second_moment``) and
the backends the arithmetic (``bbfused.backends.base.Backend.step``).

Each parameter counts its own steps, as torch's Adam does: a group's count t advances on the device (no sync) and
each parameter keeps, on the host, the steps of its group it missed (it had no gradient: frozen, or unused), its
lag L; its correction is 1 − β₂^(t − L). Parameters with other lags step in launches of their own. The measuring
pass weighs Δθ² with the group's correction (a parameter that missed steps is weighed a little lighter). The host
cannot see GradScaler's skip (it is decided on the device): a parameter without a gradient in a skipped step counts
it as missed, one step more than it lost.
"""

from __future__ import annotations

from typing import Any, Protocol

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


class StepScaling(Protocol):
    """How the step scales d and how the measuring pass weighs Δθ² (``BufferSet`` calls it; backends do the work)."""

    name: str | None  # BB's ``preconditioner`` argument
    second_moment: bool  # whether each buffer keeps a second moment

    def add_device(self, device: torch.device) -> None: ...

    def add_group(self, constructor: bool) -> None:
        """The next parameter group: one of the constructor's, or one added later (``BB.add_param_group``)."""

    def advance(self, found_inf: torch.Tensor | None) -> None:
        """Before a step's launches: one more step, unless GradScaler's ``found_inf`` is set (on the device)."""

    def add_buffer(self, params: int) -> None:
        """The next flat buffer (in the buffer set's order) holds ``params`` parameters."""

    def lags(self, buffer: int) -> list[int] | None:
        """Each parameter's lag in flat buffer ``buffer``; None when none has one (every parameter steps alike)."""

    def note_step(self, buffer: int, stepped: list[bool]) -> None:
        """Which parameters of flat buffer ``buffer`` this step updates (the others fall one more step behind)."""

    def step_arguments(
        self, group: int, device: torch.device, second_moment: torch.Tensor | None, lag: int = 0
    ) -> dict[str, Any]:
        """The backend step's keyword arguments for group ``group``'s slice ``second_moment`` on ``device``, whose
        parameters missed ``lag`` of the group's steps."""

    def measure_arguments(self, group: int, device: torch.device) -> dict[str, Any]:
        """The measuring pass's keyword arguments (its second moments aside) for group ``group`` on ``device``."""

    def group_powers(self) -> list[float]:
        """What a checkpoint keeps: per group, β₂ᵗ (none without a second moment)."""

    def load_lags(self, buffer: int, lags: list[int]) -> None:
        """Take a checked checkpoint's lags of flat buffer ``buffer``'s parameters."""

    def check_powers(self, powers: list[float]) -> None:
        """Raise ValueError unless a checkpoint's ``powers`` fit these groups."""

    def load(self, powers: list[float]) -> None:
        """Take a checked checkpoint's ``powers``."""


class NoScaling:
    """BB's SGD step: d as it is, and ‖Δθ‖² in the plain metric."""

    name = None
    second_moment = False

    def add_device(self, device: torch.device) -> None:
        pass

    def add_group(self, constructor: bool) -> None:
        pass

    def advance(self, found_inf: torch.Tensor | None) -> None:
        pass

    def add_buffer(self, params: int) -> None:
        pass

    def lags(self, buffer: int) -> list[int] | None:
        return None

    def note_step(self, buffer: int, stepped: list[bool]) -> None:
        pass

    def step_arguments(
        self, group: int, device: torch.device, second_moment: torch.Tensor | None, lag: int = 0
    ) -> dict[str, Any]:
        return {}

    def measure_arguments(self, group: int, device: torch.device) -> dict[str, Any]:
        return {}

    def group_powers(self) -> list[float]:
        return []

    def check_powers(self, powers: list[float]) -> None:
        pass  # the checkpoint's reader refuses powers without a preconditioner

    def load(self, powers: list[float]) -> None:
        pass

    def load_lags(self, buffer: int, lags: list[int]) -> None:
        pass


class AdamScaling:
    """Adam's scaling, with 1 − β₂ᵗ for each parameter group on each of its devices, t the steps the group's second
    moments have taken.

    The constructor's groups start together and share one count (their buffers may step in one launch); a group
    added later counts from its own first step, so that its first steps are Adam's first steps (a count it did not
    take would leave its zero second moment uncorrected). Kept as β₂ᵗ in a float64 0-dim tensor per device,
    multiplied by β₂ once a step on the device (no host sync, so a CUDA graph can capture it); a step GradScaler
    skips does not count, as in torch's fused Adam. Checkpoints save β₂ᵗ itself, so a resumed run continues with the
    same bits."""

    name = "adam"
    second_moment = True

    def __init__(self) -> None:
        self.devices: list[torch.device] = []
        # One count per entry: entry 0 is the constructor's groups', each added group has its own.
        self.powers: list[dict[torch.device, torch.Tensor]] = []  # β₂ᵗ
        self.corrections: list[dict[torch.device, torch.Tensor]] = []  # 1 − β₂ᵗ
        self.entry_of_group: list[int] = []
        self.buffer_lags: list[list[int]] = []  # per flat buffer, each parameter's missed steps

    def add_device(self, device: torch.device) -> None:
        self.devices.append(device)
        for powers, corrections in zip(self.powers, self.corrections):
            value = float(next(iter(powers.values())))
            powers[device] = torch.tensor(value, dtype=torch.float64, device=device)
            corrections[device] = _one_minus(powers[device])

    def add_group(self, constructor: bool) -> None:
        if not constructor or not self.powers:
            self.powers.append({d: torch.ones((), dtype=torch.float64, device=d) for d in self.devices})
            self.corrections.append({d: torch.zeros((), dtype=torch.float64, device=d) for d in self.devices})
        self.entry_of_group.append(0 if constructor else len(self.powers) - 1)

    def correction(self, group: int, device: torch.device) -> torch.Tensor:
        """1 − β₂ᵗ of group ``group`` on ``device`` (a float64 0-dim tensor, updated in place)."""
        return self.corrections[self.entry_of_group[group]][device]

    def advance(self, found_inf: torch.Tensor | None) -> None:
        for powers, corrections in zip(self.powers, self.corrections):
            for device, power in powers.items():
                if found_inf is None:
                    power.mul_(BETA2)
                else:
                    torch.where(on(found_inf, device).reshape(()) != 0, power, power * BETA2, out=power)
                _one_minus(power, out=corrections[device])

    def add_buffer(self, params: int) -> None:
        self.buffer_lags.append([0] * params)

    def lags(self, buffer: int) -> list[int] | None:
        lags = self.buffer_lags[buffer]
        return lags if any(lags) else None

    def note_step(self, buffer: int, stepped: list[bool]) -> None:
        if not all(stepped):
            self.buffer_lags[buffer] = [lag + (not has) for lag, has in zip(self.buffer_lags[buffer], stepped)]

    def step_arguments(
        self, group: int, device: torch.device, second_moment: torch.Tensor | None, lag: int = 0
    ) -> dict[str, Any]:
        correction = self.correction(group, device)
        if lag:
            # 1 − β₂^(t − L) = 1 − β₂ᵗ·β₂^(−L), from the group's β₂ᵗ on the device (no sync).
            power = self.powers[self.entry_of_group[group]][device]
            correction = _one_minus(power * BETA2**-lag)
        return {"second_moment": second_moment, "bias_correction": correction, "beta2": BETA2, "eps": EPS}

    def measure_arguments(self, group: int, device: torch.device) -> dict[str, Any]:
        return {"bias_correction": self.correction(group, device), "eps": EPS}

    def group_powers(self) -> list[float]:
        """β₂ᵗ of every group, in group order (reading them synchronises)."""
        return [float(next(iter(self.powers[entry].values()))) for entry in self.entry_of_group]

    def check_powers(self, powers: list[float]) -> None:
        """The constructor's groups share one count, so their saved powers must agree: a checkpoint whose groups
        were added one by one loads only into an optimizer built and grown the same way."""
        if len(powers) != len(self.entry_of_group):
            raise ValueError(
                f"corrupt state dict: beta2_powers lists {len(powers)} parameter groups, this optimizer has "
                f"{len(self.entry_of_group)}"
            )
        shared = [index for index, entry in enumerate(self.entry_of_group) if entry == 0]
        differing = [index for index in shared if powers[index] != powers[shared[0]]]
        if differing:
            raise ValueError(
                f"the state dict's param_groups[{differing[0]}] took other steps than param_groups[{shared[0]}] "
                f"(beta2_powers {powers[differing[0]]!r} and {powers[shared[0]]!r}): it was added to the saved "
                f"optimizer later (add_param_group), while this optimizer was built with both. Build it with the "
                f"groups the saved one was built with, add the others with add_param_group, then load"
            )

    def load_lags(self, buffer: int, lags: list[int]) -> None:
        self.buffer_lags[buffer] = list(lags)

    def load(self, powers: list[float]) -> None:
        for power, entry in zip(powers, self.entry_of_group):
            for device, tensor in self.powers[entry].items():
                tensor.fill_(power)
                _one_minus(tensor, out=self.corrections[entry][device])


def scaling_for(preconditioner: str | None) -> StepScaling:
    """The implementation of BB's ``preconditioner`` argument (checked already)."""
    return NoScaling() if preconditioner is None else AdamScaling()


def _one_minus(power: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """1 − power as 1 + (−power): the same bits, and with ``out`` written in place (a captured step allocates
    nothing)."""
    return torch.mul(power, -1.0, out=out).add_(1.0)
