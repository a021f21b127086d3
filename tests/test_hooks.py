"""Rollback and period-end hooks (bbfused.hooks): when they are called, with what, and where they are refused."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from test_paper import reported_loss_epochs as epochs_with_losses  # ½‖θ‖² with a loss given to each step

from bbfused import BB


def quadratic(lr: float, **kwargs) -> tuple[BB, torch.nn.Parameter]:
    theta = torch.nn.Parameter(torch.ones(16))
    return BB([theta], lr=lr, steps_per_epoch=10, backend="eager", **kwargs), theta


def recorders(opt: BB) -> tuple[list, list]:
    rollbacks, ends = [], []
    opt.register_rollback_hook(lambda o, epoch: rollbacks.append((epoch, o.epoch, o.step_in_epoch)))
    opt.register_period_end_hook(lambda o, epoch, back: ends.append((epoch, back)))
    return rollbacks, ends


def test_rollback_hook_hears_each_rolled_back_period_with_its_epoch() -> None:
    """η0 = 1e300 diverges in the first three periods of the split first epoch (rolled back: 100, 10 diverge too),
    then epochs go well; a loss 2.7-fold of the best in epoch 2 rolls that epoch back."""
    opt, theta = quadratic(1e300, momentum=0.0)
    rollbacks, ends = recorders(opt)
    epochs_with_losses(opt, theta, [[None] * 10])
    assert opt.rolled_back_epochs == [0]
    # Each rolled-back period of epoch 0 is heard once, after its end (the hook sees the counts of the next period).
    assert [r[0] for r in rollbacks] == [0, 0, 0] and rollbacks[-1] != (0, 1, 0)
    assert [e for e in ends if e[1]] == [(0, True)] * 3 and len(ends) == 5  # 4 periods (2 steps) + the remainder
    assert ends[-1] == (0, False)


def test_rollback_hook_epoch_is_the_rolled_back_epoch_and_handles_remove() -> None:
    opt, theta = quadratic(0.1, momentum=0.0, tau_max=0.1)
    rollbacks, ends = recorders(opt)
    extra = []
    handle = opt.register_rollback_hook(lambda o, epoch: extra.append(epoch))
    epochs_with_losses(opt, theta, [[2.0] + [1.0] * 9, [1.0] * 10, [2.7] * 10])
    assert opt.rolled_back_epochs == [2]
    assert rollbacks == [(2, 3, 0)] and extra == [2]
    assert ends[-3:] == [(0, False), (1, False), (2, True)]
    handle.remove()
    epochs_with_losses(opt, theta, [[1.0] * 10, [5.0] * 10])  # a second loss rollback in a row would be kept
    assert opt.rolled_back_epochs == [2, 4] and extra == [2] and rollbacks[-1][0] == 4


def test_paper_mode_never_rolls_back_so_never_calls_the_rollback_hook() -> None:
    opt, theta = quadratic(1e300, safeguard=False)
    rollbacks, ends = recorders(opt)
    epochs_with_losses(opt, theta, [[None] * 10] * 3)
    assert rollbacks == [] and ends == [(0, False), (1, False), (2, False)]


def test_end_epoch_calls_the_hooks_too() -> None:
    theta = torch.nn.Parameter(torch.ones(4))
    opt = BB([theta], lr=0.1, beta=0.5, backend="eager")
    _, ends = recorders(opt)
    for _ in range(3):
        opt.zero_grad()
        (0.5 * theta.square().sum()).backward()
        opt.step()
    opt.end_epoch()
    assert ends == [(0, False)]


def test_hooks_are_refused_in_capturable_mode_with_the_alternative() -> None:
    opt, _ = quadratic(0.1, capturable=True)
    for register in (opt.register_rollback_hook, lambda fn: opt.register_period_end_hook(fn)):
        with pytest.raises(RuntimeError, match="capturable=True.*rolled_back_epochs.*capturable=False"):
            register(lambda *args: None)


def test_a_hook_must_be_callable() -> None:
    opt, _ = quadratic(0.1)
    with pytest.raises(TypeError, match="callable"):
        opt.register_rollback_hook(3)


def test_copies_drop_the_hooks_as_torch_optim_copies_do() -> None:
    opt, theta = quadratic(1e300, momentum=0.0)
    rollbacks, _ = recorders(opt)
    twin_theta, twin = copy.deepcopy((theta, opt))
    pickled = pickle.loads(pickle.dumps(opt))
    epochs_with_losses(twin, twin_theta, [[None] * 10])
    assert twin.rolled_back_epochs == [0] and rollbacks == []
    assert not pickled._optimizer_period_hooks and not twin._optimizer_period_hooks
    twin.register_rollback_hook(lambda o, epoch: rollbacks.append(epoch))  # a copy takes hooks of its own
