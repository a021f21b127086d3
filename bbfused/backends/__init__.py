"""Backend registry: resolves a backend name and a device to an implementation of ``base.Backend``."""

from __future__ import annotations

import importlib

import torch

from ..diagnostics import warn
from .base import Backend, BackendUnavailableError

# name -> module (relative to this package) holding the backend class and ``unavailable_reason(device)``.
_MODULES = {
    "eager": ("eager", "EagerBackend"),
    "triton": ("triton_backend", "TritonBackend"),
    "cpp": ("cpp_backend", "CppBackend"),
}
BACKEND_NAMES = ("auto", *_MODULES)
# What "auto" tries first for each device type; eager is the last resort everywhere.
_FASTEST = {"cuda": "triton", "cpu": "cpp"}


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device``, or None when it can."""
    module_name, _ = _MODULES[name]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as error:
        return f"importing bbfused.backends.{module_name} failed: {error}"
    return module.unavailable_reason(device)


def load_backend(name: str, device: torch.device) -> Backend:
    """The backend ``name`` ("auto", "eager", "triton" or "cpp") for parameters on ``device``."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "auto":
        fastest = _FASTEST.get(device.type)
        if fastest is None:
            return _instantiate("eager")
        reason = unavailable_reason(fastest, device)
        if reason is None:
            return _instantiate(fastest)
        warn(
            f"bbfused: the {fastest} backend is unavailable on {device} ({reason}); using the slower eager "
            f"backend. Pass backend='eager' to silence this warning.",
            RuntimeWarning,
        )
        return _instantiate("eager")
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend={name!r} cannot run on {device}: {reason}")
    return _instantiate(name)


def _instantiate(name: str) -> Backend:
    module_name, class_name = _MODULES[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, class_name)()


__all__ = ["BACKEND_NAMES", "Backend", "BackendUnavailableError", "load_backend", "unavailable_reason"]
