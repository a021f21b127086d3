"""Warnings that point at the user's line.

BB's warnings are raised deep inside ``step()``, ``load_state_dict()`` or the constructor, behind torch's
``no_grad`` and step-hook wrappers (and ``GradScaler.step``), so no fixed ``stacklevel`` is right for every
path. :func:`warn` attributes the warning to the first frame outside the optimizer's modules and torch.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
# The optimizer's own modules (by __name__); the training command is a caller like any other.
_INTERNAL_MODULES = (
    "bbfused.optimizer",
    "bbfused.buffers",
    "bbfused.buffer_set",
    "bbfused.checkpoint",
    "bbfused.clock",
    "bbfused.groups",
    "bbfused.missing_loss",
    "bbfused.rule",
    "bbfused.shown_rate",
)
_INTERNAL_PACKAGES = ("bbfused.backends", "bbfused.control", "bbfused.diagnostics")


def _internal(frame) -> bool:
    module = frame.f_globals.get("__name__", "")
    if module in _INTERNAL_MODULES or module == "bbfused" or module.startswith(_INTERNAL_PACKAGES):
        return True
    return frame.f_code.co_filename.startswith(_TORCH_DIR)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the nearest caller outside bbfused's optimizer and torch."""
    frame = sys._getframe(1)
    level = 2  # stacklevel 2 is warn()'s caller
    while frame.f_back is not None and _internal(frame):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
