"""Hooks called at BB's rate-period ends, in the spirit of torch.optim's step hooks.

* a **rollback hook** ``fn(optimizer, epoch)`` is called after a period end that rolled the period back (the
  default control; the paper's method never rolls back, so never calls it): the parameters, the tracked model
  buffers and the momentum are back at the last good period end. ``epoch`` is the epoch the period belonged to (a
  period of the split first epoch: 0).
* a **period-end hook** ``fn(optimizer, epoch, rolled_back)`` is called after every period end (an epoch's, or one
  of the split first epoch's periods), rolled back or not (``rolled_back`` is a bool; always False with
  ``safeguard=False``). With it, state kept outside BB (an EMA of the weights) can be remembered at each good
  period end and restored at a rollback.

Both run on the host after the epoch end has been committed, inside the ``step()`` (or ``end_epoch()``) that closed
the period; ``optimizer.epoch`` and ``optimizer.step_in_epoch`` already count the next period. A hook that raises
propagates out of that call; the epoch end is not run again. With any hook registered, each period end reads one
flag from the device (one sync on CUDA; none without hooks). ``BB(capturable=True)`` decides rollbacks inside a
captured graph, which never returns to Python: it refuses these hooks (read ``rolled_back_epochs`` after replays
instead). Copies of the optimizer (``copy.deepcopy``, pickling) drop the hooks, as torch.optim's copies do.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

RollbackHook = Callable[[Any, int], None]
PeriodEndHook = Callable[[Any, int, bool], None]


class PeriodHooks:
    """The registered rollback and period-end hooks, in registration order."""

    def __init__(self) -> None:
        self.rollback: OrderedDict[int, RollbackHook] = OrderedDict()
        self.period_end: OrderedDict[int, PeriodEndHook] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self.rollback or self.period_end)

    @staticmethod
    def register(table: OrderedDict[int, Callable[..., None]], hook: Callable[..., None]) -> RemovableHandle:
        if not callable(hook):
            raise TypeError(f"a hook must be callable, got {type(hook).__name__}")
        handle = RemovableHandle(table)
        table[handle.id] = hook
        return handle

    def period_ended(self, optimizer: Any, epoch: int, rolled_back: torch.Tensor | None) -> None:
        """Call the hooks for a period of ``epoch`` that just ended (``rolled_back``: the control's flag, None when
        it never rolls back)."""
        if not self:
            return
        back = rolled_back is not None and bool(rolled_back)
        for hook in list(self.period_end.values()):
            hook(optimizer, epoch, back)
        if back:
            for hook in list(self.rollback.values()):
                hook(optimizer, epoch)


class PeriodHookRegistry:
    """Rollback and period-end hook registration for :class:`bbfused.BB` (its tables: ``_optimizer_period_hooks``,
    named as torch.optim names its hook tables, so copies drop them)."""

    _optimizer_period_hooks: PeriodHooks
    _clock: Any

    def register_rollback_hook(self, hook: RollbackHook) -> RemovableHandle:
        """Call ``hook(optimizer, epoch)`` on the host after every period end that rolled its period back (the
        default control; never with ``safeguard=False``), e.g. to restore state kept outside BB. Refused with
        ``capturable=True``. Returns a handle whose ``remove()`` unregisters it. See ``bbfused.hooks``."""
        self._clock.check_host_hooks()
        return PeriodHooks.register(self._optimizer_period_hooks.rollback, hook)

    def register_period_end_hook(self, hook: PeriodEndHook) -> RemovableHandle:
        """Call ``hook(optimizer, epoch, rolled_back)`` on the host after every rate-period end (each epoch's, and
        the split first epoch's periods), e.g. to remember state kept outside BB at each good period end. Refused
        with ``capturable=True``. Returns a handle whose ``remove()`` unregisters it. See ``bbfused.hooks``."""
        self._clock.check_host_hooks()
        return PeriodHooks.register(self._optimizer_period_hooks.period_end, hook)
