"""Calling a backend's kernels with the arguments in their order: the tests hold them as lists."""

from __future__ import annotations

import torch


def backend_step(
    backend,
    param,
    grad,
    ema,
    lr,
    weight_decay,
    beta,
    grad_scale=None,
    found_inf=None,
    nonfinite=None,
    momentum_buffer=None,
    momentum=0.0,
    nesterov=False,
):
    backend.step(
        param,
        grad,
        ema,
        lr=lr,
        weight_decay=weight_decay,
        beta=beta,
        grad_scale=grad_scale,
        found_inf=found_inf,
        nonfinite=nonfinite,
        momentum_buffer=momentum_buffer,
        momentum=momentum,
        nesterov=nesterov,
    )


def backend_pass(pass_function, param, ema, prev_params, prev_ema, enabled=None) -> torch.Tensor:
    """``backend.epoch_end`` or ``backend.epoch_measure`` with ``enabled`` given by position."""
    return pass_function(param, ema, prev_params, prev_ema, enabled=enabled)
