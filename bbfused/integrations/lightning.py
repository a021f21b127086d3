"""BB under Lightning: ``steps_per_epoch(trainer)`` and the ``BBCallback``.

``BBCallback`` makes Lightning's loop and BB agree: it checks that a BB epoch is a Lightning epoch (optimizer steps,
not batches, under ``accumulate_grad_batches``), gives BB each optimizer step's loss (the mean of its micro-batch
losses, also under 16-bit AMP, where Lightning's ``GradScaler`` path passes none), and lets gradient clipping run under
16-bit and bf16 AMP (Lightning refuses it for optimizers that unscale in ``step()``; under 16-bit AMP the gradients
are unscaled before clipping instead, and BB then skips its own unscaling, without a host sync).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

from ..optimizer import BB
from ._loss import StepLoss, unwrap


def steps_per_epoch(trainer: pl.Trainer) -> int:
    """The optimizer steps in one of ``trainer``'s epochs: ``ceil(batches / accumulate_grad_batches)`` (Lightning
    steps on an epoch's last batch even when its accumulation window is short). Call it in ``configure_optimizers``."""
    trainer.estimated_stepping_batches  # noqa: B018 -- sets up the train dataloader so its length is known
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise ValueError(
            "the train dataloader has no length, so a BB epoch cannot follow Lightning's epochs; build BB with "
            "steps_per_epoch=N for a fixed N (an epoch of N optimizer steps), or give the dataset a __len__"
        )
    return math.ceil(batches / trainer.accumulate_grad_batches)


class BBMixedPrecision(MixedPrecision):
    """16-bit AMP for BB: hooks see the unscaled loss, and clipping unscales the gradients first.

    ``BBCallback`` puts it in place of Lightning's ``MixedPrecision`` (``"16-mixed"`` with its ``GradScaler``, and
    ``"bf16-mixed"``, which has none: there clipping needs no unscaling, only Lightning's refusal lifted)."""

    def pre_backward(self, tensor: Any, module: pl.LightningModule) -> Any:
        # Hooks first (BBCallback reads the loss there), then the scaling.
        tensor = Precision.pre_backward(self, tensor, module)
        return self.scaler.scale(tensor) if self.scaler is not None else tensor

    def clip_gradients(self, optimizer: Any, clip_val: float = 0.0, gradient_clip_algorithm: Any = None) -> None:
        if clip_val > 0 and self.scaler is not None:
            # GradScaler then hands BB found_inf without grad_scale: BB skips its own unscaling.
            self.scaler.unscale_(optimizer)
        kwargs = {} if gradient_clip_algorithm is None else {"gradient_clip_algorithm": gradient_clip_algorithm}
        Precision.clip_gradients(self, optimizer, clip_val=clip_val, **kwargs)


class BBCallback(pl.Callback):
    """Add to ``Trainer(callbacks=[...])`` when a ``configure_optimizers`` returns a ``bbfused.BB``."""

    def __init__(self) -> None:
        self._loss = StepLoss()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        plugin = trainer.strategy.precision_plugin
        # Also without a scaler (bf16-mixed): Lightning refuses clipping for any optimizer that unscales itself.
        if type(plugin) is MixedPrecision:
            trainer.strategy.precision_plugin = BBMixedPrecision(plugin.precision, plugin.device, plugin.scaler)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        expected = steps_per_epoch(trainer)
        for optimizer in (unwrap(o) for o in trainer.optimizers):
            if not isinstance(optimizer, BB):
                continue
            if optimizer.steps_per_epoch is not None and optimizer.steps_per_epoch != expected:
                raise ValueError(
                    f"BB was built with steps_per_epoch={optimizer.steps_per_epoch}, but a Lightning epoch has "
                    f"{expected} optimizer steps ({trainer.num_training_batches} batches, accumulate_grad_batches="
                    f"{trainer.accumulate_grad_batches}); build it with steps_per_epoch="
                    f"bbfused.integrations.lightning.steps_per_epoch(self.trainer) in configure_optimizers"
                )
            self._loss.attach(optimizer)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        self._loss.add(loss)  # divided by accumulate_grad_batches already: the window's sum is its mean

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in (unwrap(o) for o in trainer.optimizers):
            if isinstance(optimizer, BB) and optimizer.steps_per_epoch is None and optimizer.step_in_epoch:
                optimizer.end_epoch()  # BB built with steps_per_epoch=None: its epochs are Lightning's

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loss.detach_all()
