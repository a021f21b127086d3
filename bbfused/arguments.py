"""The checks of BB's arguments (and of the same values read back from a checkpoint).

Numbers may be Python or NumPy scalars or one-element real tensors, read once, as torch.optim takes ``lr``. Every
check raises ValueError (TypeError for a wrong kind of object) naming the argument, what was given and the fix.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .backends import BACKEND_NAMES
from .devices import on
from .preconditioner import check_preconditioner

try:
    from numpy import bool_ as numpy_bool
except ImportError:  # NumPy is optional; without it no value is a NumPy bool
    numpy_bool = bool

SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class ArgumentTypeError(TypeError, ValueError):
    """A number argument given a wrong kind of object (a string, None, a bool, a complex number): a TypeError, as
    torch.optim raises for one, that ``except ValueError`` also catches, as it catches every other argument error."""


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number: a Python or NumPy int or float (bool excluded: True is not a rate or a
    loss)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, numpy_bool))


def is_int(value: Any) -> bool:
    """Whether ``value`` is a Python or NumPy int (bool excluded)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, numpy_bool))


def as_number(name: str, value: Any, integer: bool = False) -> float | int:
    """``value`` as a Python float (an int with ``integer``): a Python or NumPy real number, or a one-element real
    tensor. A tensor of another shape or dtype raises ValueError, any other object :class:`ArgumentTypeError`, both
    naming the problem and the fix."""
    kind = "an int" if integer else "a number"
    if isinstance(value, torch.Tensor):
        found = f"a {value.dtype} tensor of shape {tuple(value.shape)}"
        if value.numel() != 1:
            raise ValueError(f"{name} must be {kind}, got {found}; pass a single value or a one-element tensor")
        if value.is_complex() or value.dtype == torch.bool or (integer and value.is_floating_point()):
            wanted = "an integer" if integer else "a real (floating-point or integer)"
            raise ValueError(f"{name} must be {kind}, got {found}; pass {wanted} tensor or a Python number")
        if value.is_meta:
            raise ValueError(f"{name} must be {kind}, got {found} on the meta device, which holds no value")
        return int(value.item()) if integer else float(value.item())
    if is_int(value) or (not integer and is_real(value)):
        return int(value) if integer else float(value)
    if isinstance(value, (bool, numpy_bool)):
        problem = "a bool"
    elif isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real):
        problem = "complex"
    else:
        problem = f"of type {type(value).__name__}"
    example = "a Python int" if integer else "a float, a NumPy scalar or a one-element real tensor"
    raise ArgumentTypeError(f"{name} must be {kind}, got {value!r} ({problem}); pass {example}")


def check_positive(name: str, value: Any) -> float:
    number = as_number(name, value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}; pass a positive value")
    return number


def check_beta(value: Any) -> float:
    number = as_number("beta", value)
    if not 0 < number <= 1:
        raise ValueError(f"beta must be in (0, 1], got {value!r} (the paper uses 4/steps_per_epoch)")
    return number


def default_beta(steps_per_epoch: int | None) -> float:
    """The paper's EMA factor 4/T (at most 1)."""
    if steps_per_epoch is None:
        raise ValueError(
            "steps_per_epoch is missing: pass steps_per_epoch=len(loader), the number of step() calls per epoch. "
            "To end each epoch yourself with end_epoch() instead, keep steps_per_epoch=None; beta is required then: "
            "pass beta=4/T for your expected steps per epoch T"
        )
    return min(1.0, 4.0 / steps_per_epoch)


def check_weight_decay(value: Any, where: str = "") -> float:
    number = as_number(f"weight_decay{where}", value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"weight_decay{where} must be a finite number >= 0, got {value!r}; pass 0 for none")
    return number


def positive_int_or_none(name: str, value: Any, what: str = "", advice: str = "") -> int | None:
    """``value`` as a positive int, or None; the error says ``what`` the number is and the ``advice``."""
    if value is None:
        return None
    number = as_number(name, value, integer=True)
    if number <= 0:
        raise ValueError(f"{name} must be a positive int{what} or None, got {value!r}{advice}")
    return number


def check_steps_per_epoch(value: Any) -> int | None:
    """``steps_per_epoch`` as a positive int, or None."""
    return positive_int_or_none("steps_per_epoch", value, advice="; pass len(loader)")


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def watched_loss(
    loss: Any, name: str | None, device: torch.device, check_number: Callable[[float], None]
) -> torch.Tensor | None:
    """``loss`` as a 0-dim tensor on the master device, or None. ``name``: the argument it came from, checked
    (a closure's return value that is not a loss is just not used); ``check_number`` raises where a Python number
    cannot serve (a captured step)."""
    if isinstance(loss, torch.Tensor) and loss.is_floating_point() and loss.numel() == 1:
        return on(loss.detach().reshape(()), device)
    if is_real(loss):
        check_number(loss)
        return torch.tensor(float(loss), dtype=torch.float64, device=device)
    if name is None or loss is None:
        return None
    found = f"a {loss.dtype} tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else repr(loss)
    raise TypeError(
        f"{name} must be this step's training loss as a one-element floating-point tensor or a number, got "
        f"{found}; pass the scalar the backward pass started from (e.g. loss=loss), or leave it out"
    )


@dataclass(frozen=True)
class Options:
    """BB's constructor arguments, checked; ``None`` where the rate control's own default applies."""

    lr: float
    steps_per_epoch: int | None
    epochs: int | None
    beta: float
    weight_decay: float
    momentum: float | None
    nesterov: bool
    taus: tuple[float | None, float | None, float | None]
    backend: str
    safeguard: bool
    capturable: bool
    preconditioner: str | None


def check_nesterov(nesterov: bool, momentum: float) -> None:
    """Nesterov momentum needs a momentum (given, or the mode's default)."""
    if nesterov and not momentum:
        raise ValueError("nesterov=True needs a momentum > 0; pass momentum=0.9 or drop nesterov")


def check_options(
    lr: Any,
    steps_per_epoch: Any,
    epochs: Any,
    weight_decay: Any,
    momentum: Any,
    nesterov: Any,
    beta: Any,
    tau0: Any,
    tau_min: Any,
    tau_max: Any,
    backend: Any,
    safeguard: Any,
    capturable: Any,
    preconditioner: Any = None,
) -> Options:
    """Every constructor argument checked, in the order of the signature; the first bad one raises."""
    lr = check_positive("lr", lr)
    steps = check_steps_per_epoch(steps_per_epoch)
    epochs = check_epochs(epochs)
    weight_decay = check_weight_decay(weight_decay)
    momentum = None if momentum is None else check_momentum(momentum)
    nesterov = check_flag("nesterov", nesterov)
    if momentum is not None:
        check_nesterov(nesterov, momentum)
    beta = check_beta(default_beta(steps) if beta is None else beta)
    taus = tuple(
        None if value is None else check_positive(name, value) for name, value in zip(TAUS, (tau0, tau_min, tau_max))
    )
    if taus[1] is not None and taus[2] is not None and taus[1] > taus[2]:
        raise ValueError(f"tau_min ({tau_min}) must be <= tau_max ({tau_max})")
    safeguard, capturable = check_flag("safeguard", safeguard), check_flag("capturable", capturable)
    if capturable and steps is None:
        raise ValueError(
            "capturable=True needs steps_per_epoch: a captured step counts its epoch on the device and closes it "
            "there, while end_epoch() is a host call a graph replay never makes. Pass steps_per_epoch=T"
        )
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)}")
    preconditioner = check_preconditioner(preconditioner)
    if preconditioner is not None and not safeguard:
        raise ValueError(
            f"preconditioner={preconditioner!r} needs the default rate control: the paper's method "
            f"(safeguard=False) is SGD exactly. Drop safeguard=False, or the preconditioner"
        )
    return Options(
        lr, steps, epochs, beta, weight_decay, momentum, nesterov, taus, backend, safeguard, capturable, preconditioner
    )


TAUS = ("tau0", "tau_min", "tau_max")


def check_epochs(value: Any) -> int | None:
    """The planned number of epochs, a positive int, or None (not known)."""
    return positive_int_or_none("epochs", value, what=" (the epochs the run will train)")


def check_momentum(value: Any) -> float:
    number = as_number("momentum", value)
    if not 0.0 <= number < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {value!r} (the old direction's weight; 0.9 is usual)")
    return number
