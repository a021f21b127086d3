"""The per-optimizer-step loss handed to ``BB.step`` by a step pre-hook, for clients that never pass it."""

from __future__ import annotations

from typing import Any

import torch

from ..optimizer import BB


def unwrap(optimizer: Any) -> Any:
    """The optimizer under the clients' wrappers (Lightning's LightningOptimizer, accelerate's AcceleratedOptimizer)."""
    for _ in range(4):
        if isinstance(optimizer, BB):
            return optimizer
        inner = getattr(optimizer, "_optimizer", None) or getattr(optimizer, "optimizer", None)
        if inner is None:
            return optimizer
        optimizer = inner
    return optimizer


class StepLoss:
    """Sums the micro-batch losses of one optimizer step and gives their sum to ``BB.step`` as ``loss=``.

    Clients divide each micro-batch's loss by the accumulation count before backward, so the sum of what they
    report is the mean over the step's micro-batches, the loss of the step that BB's rate control watches.
    """

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.handles: list = []

    def add(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float().reshape(())
        self.total = loss.clone() if self.total is None else self.total + loss

    def take(self) -> torch.Tensor | None:
        total, self.total = self.total, None
        return total

    def attach(self, optimizer: BB) -> None:
        """Register the step pre-hook that passes the sum (a step with a closure runs it first: see ``wrap``)."""
        self.handles.append(optimizer.register_step_pre_hook(self._pre_step))

    def detach_all(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _pre_step(self, optimizer: BB, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if kwargs.get("loss") is not None:
            return None  # the caller gave one
        # torch.optim passes the optimizer itself as args[0]; a closure is args[1] or a keyword.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            return args, {**kwargs, "loss": self.take()}

        def closure_returning_the_step_loss() -> Any:
            # BB watches a closure's return value: the micro-batches' sum once this one's backward has run.
            result = closure()
            total = self.take()
            return result if total is None or result is None else total

        return args[:1], {**kwargs, "closure": closure_returning_the_step_loss}
