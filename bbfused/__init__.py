"""bbfused: SGD with the Barzilai–Borwein adaptive learning rate, as fused multi-tensor kernels."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backends import BackendUnavailableError
    from .buffers import GradientReplacedWarning
    from .missing_loss import MissingLossWarning
    from .optimizer import BB

__version__ = "0.1.0"
__all__ = ["BB", "BackendUnavailableError", "GradientReplacedWarning", "MissingLossWarning", "__version__"]

# Imported on first use: importing the optimizer loads torch and torch._dynamo (seconds), which the training
# command's --help and its checks of the command line do not need.
_EXPORTS = {
    "BB": ".optimizer",
    "BackendUnavailableError": ".backends",
    "GradientReplacedWarning": ".buffers",
    "MissingLossWarning": ".missing_loss",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
