"""BB under Hugging Face's ``Trainer``: ``BBTrainer``.

``BBTrainer`` builds BB from ``TrainingArguments`` (``learning_rate`` as η0, ``weight_decay`` on the parameters
Trainer decays: not on biases and norms), with ``steps_per_epoch`` counted in optimizer steps under
``gradient_accumulation_steps``. It replaces Trainer's scheduler by one that writes nothing and reports BB's rate (so
the logged ``learning_rate`` is BB's), restores BB's gradient views after Trainer's ``model.zero_grad()`` before
backward writes into them (no copy, no ``GradientReplacedWarning``), and gives BB each optimizer step's loss (the
mean of its micro-batch losses), which Trainer never passes to ``step()``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ..optimizer import BB
from ._loss import StepLoss, unwrap


class BBRate(torch.optim.lr_scheduler.LRScheduler):
    """A scheduler that changes nothing and reports the rate BB's last step used (Trainer logs ``get_last_lr()``)."""

    def __init__(self, optimizer: BB) -> None:  # noqa: D107 -- LRScheduler.__init__ would write the groups' lr
        self.optimizer = optimizer
        self.last_epoch = 0
        self._last_lr = [group["lr"] for group in optimizer.param_groups]
        self._get_lr_called_within_step = False

    def before_step(self) -> None:
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # floats: no sync

    def step(self, epoch: int | None = None) -> None:
        self.last_epoch += 1

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch}  # the rate itself is in BB's state dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_epoch = state_dict.get("last_epoch", 0)


class _RestoreGradientViews(TrainerCallback):
    """Trainer calls ``model.zero_grad()`` (gradients set to None); BB's ``zero_grad`` puts its views back in place
    before the next accumulation window's backward, so backward writes into BB's buffer directly."""

    def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        optimizer = unwrap(optimizer)
        if isinstance(optimizer, BB):
            optimizer.zero_grad()


class BBTrainer(Trainer):
    """``transformers.Trainer`` that trains with ``bbfused.BB``.

    ``bb_kwargs``: further keyword arguments of ``BB`` (``tau_min``, ``safeguard``, ``backend`` ...). An optimizer
    passed as ``optimizers=(BB(...), None)`` is used as it is (its ``steps_per_epoch`` is checked); any scheduler
    given there is replaced by :class:`BBRate`."""

    def __init__(self, *args: Any, bb_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bb_kwargs = dict(bb_kwargs or {})
        self._bb_steps_per_epoch: int | None = None
        self._bb_epochs: int | None = None
        self._bb_loss = StepLoss()
        self.add_callback(_RestoreGradientViews())

    def set_initial_training_values(self, *args: Any, **kwargs: Any) -> Any:
        values = super().set_initial_training_values(*args, **kwargs)
        self._bb_steps_per_epoch = values[1]  # num_update_steps_per_epoch: optimizer steps, after accumulation
        self._bb_epochs = math.ceil(values[0])  # num_train_epochs: BB's end phase plans for them
        return values

    def create_optimizer(self, model: Any = None) -> BB:
        if self.optimizer is None:
            kwargs = {
                "lr": self.args.learning_rate,
                "steps_per_epoch": self._bb_steps_per_epoch,
                "epochs": self._bb_epochs,
                **self.bb_kwargs,
            }
            self.optimizer_cls_and_kwargs = (BB, kwargs)
            super().create_optimizer(model)
            self.optimizer.track_buffers(self.model)
        optimizer = unwrap(self.optimizer)
        if not isinstance(optimizer, BB):
            raise TypeError(f"BBTrainer trains with bbfused.BB, got {type(optimizer).__name__}; use Trainer for it")
        if optimizer.steps_per_epoch not in (None, self._bb_steps_per_epoch):
            raise ValueError(
                f"BB was built with steps_per_epoch={optimizer.steps_per_epoch}, but a Trainer epoch has "
                f"{self._bb_steps_per_epoch} optimizer steps (gradient_accumulation_steps="
                f"{self.args.gradient_accumulation_steps}); leave the optimizer to BBTrainer or build it with that"
            )
        if not self._bb_loss.handles:
            self._bb_loss.attach(optimizer)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> BBRate:
        if not isinstance(self.lr_scheduler, BBRate):
            self.lr_scheduler = BBRate(unwrap(optimizer or self.optimizer))
            optimizer = unwrap(optimizer or self.optimizer)
            optimizer.register_step_pre_hook(lambda *_: self.lr_scheduler.before_step())
        return self.lr_scheduler

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)
        self._bb_loss.add(loss)  # divided by the window's micro-batch count already: the window's sum is its mean
        return loss
