"""One warning when BB's steps come without the loss where BB can tell that the rate control needs it.

Without the loss the default control watches only non-finite values and the weights' growth. Two cases need more:

* a model with BatchNorm (BB knows of it from ``track_buffers(model)``): BatchNorm makes the weights before it
  scale-invariant, so a rate too large for them wrecks the network while the weights hardly grow;
* Hugging Face's plain ``Trainer``, which never passes the loss to ``step()`` and writes its own schedule into the
  groups' ``"lr"`` (which BB applies as a multiplier of its rate); ``BBTrainer`` does neither.

Where a wrapper's ``step()`` takes no ``loss=`` (accelerate's ``AcceleratedOptimizer``), a closure that returns the
loss passes through it: BB watches what a closure returns. The check runs at the first step without a loss only
(one walk up the caller's frames, for the Trainer), so it costs nothing per step.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .diagnostics import warn

_FRAMES = 64  # how far up from step() a Trainer's training loop is looked for


class MissingLossWarning(UserWarning):
    """BB's steps come without the loss where its rate control needs it (``bbfused.missing_loss``)."""


class MissingLoss:
    """Warns at the first step without a loss (once per optimizer) when the model has BatchNorm or the step comes
    from a plain Hugging Face ``Trainer``."""

    def __init__(self) -> None:
        self.batch_norm = False  # a tracked model has BatchNorm and the rate control watches the loss
        self.checked = False

    def track(self, model: torch.nn.Module, watches_loss: bool) -> None:
        """``model``: the one given to ``track_buffers``; ``watches_loss``: whether the rate control uses the loss
        (the paper's method never does)."""
        self.batch_norm = watches_loss and any(isinstance(m, _BatchNorm) for m in model.modules())

    def step(self, loss: torch.Tensor | None) -> None:
        """Called by every step with the loss it was given (None: none)."""
        if loss is not None or self.checked:
            return
        self.checked = True
        trainer = _plain_hf_trainer()
        if trainer is not None:
            warn(
                f"bbfused.BB is stepped by transformers' {trainer}, which gives step() no loss (BB's rate control "
                f"then cannot see a diverging loss) and scales BB's rate by its own learning-rate schedule (a "
                f"linear decay by default). Use bbfused.integrations.huggingface.BBTrainer in its place: it gives "
                f"BB each optimizer step's loss, leaves the rate to BB and logs BB's rate",
                MissingLossWarning,
            )
        elif self.batch_norm:
            warn(
                "bbfused.BB: a step came without the loss, and the model given to track_buffers() has BatchNorm. "
                "BatchNorm makes the weights before it scale-invariant, so a rate too large for them can wreck the "
                "network while the weights hardly grow, and without the loss the rate control does not see it. "
                "Pass each step's loss: opt.step(loss=loss), or, where a wrapper's step() takes no loss= "
                "(accelerate's AcceleratedOptimizer), a closure that returns it: opt.step(lambda: loss)",
                MissingLossWarning,
            )


def _plain_hf_trainer() -> str | None:
    """The class name of the ``transformers.Trainer`` (not one of bbfused's) whose training loop called this step,
    or None. transformers is not imported here: when it is not loaded, no Trainer runs."""
    module = sys.modules.get("transformers.trainer")
    if module is None:
        return None
    frame: Any = sys._getframe(2)
    for _ in range(_FRAMES):
        if frame is None:
            return None
        if frame.f_code.co_varnames[:1] == ("self",):
            owner = frame.f_locals.get("self")
            if isinstance(owner, module.Trainer):
                ours = any(kind.__module__.startswith("bbfused.") for kind in type(owner).__mro__)  # BBTrainer
                return None if ours else type(owner).__name__
        frame = frame.f_back
    return None
