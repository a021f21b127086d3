"""bbfused: SGD with the Barzilai–Borwein adaptive learning rate, as fused multi-tensor kernels."""

from .backends import BackendUnavailableError
from .buffers import GradientReplacedWarning
from .optimizer import BB

__version__ = "0.1.0"
__all__ = ["BB", "BackendUnavailableError", "GradientReplacedWarning", "__version__"]
