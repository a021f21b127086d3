"""The eager backend: plain PyTorch ops, any device. Slow and obviously right: the reference for the others."""

from __future__ import annotations

import torch

from .base import check_momentum_arguments, zero_momentum_if_rolled_back


class EagerBackend:
    name = "eager"

    def step(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        ema: torch.Tensor,
        *,
        lr: torch.Tensor,
        weight_decay: float,
        beta: float,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
        nonfinite: torch.Tensor | None = None,
        momentum_buffer: torch.Tensor | None = None,
        momentum: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        check_momentum_arguments(momentum_buffer, momentum, nesterov)
        theta = param.to(ema.dtype)
        d = grad.to(ema.dtype)
        if grad_scale is not None:
            d = d / grad_scale
        if weight_decay != 0:
            d = d + weight_decay * theta
        direction = d
        if momentum_buffer is not None:
            # Python floats: torch rounds each to the compute dtype once, as the fused kernels do.
            complement = 1.0 - momentum
            new_momentum = momentum_buffer + complement * (d - momentum_buffer)
            direction = complement * d + momentum * new_momentum if nesterov else new_momentum
        new_theta = theta - lr.to(ema.dtype) * direction
        new_ema = ema + beta * (d - ema)
        if nonfinite is not None:
            finite = torch.isfinite(d)
            skipped = (~finite).sum()
            if found_inf is not None:
                skipped = torch.where(found_inf.reshape(()) != 0, torch.zeros_like(skipped), skipped)
            nonfinite.add_(skipped)
            new_theta = torch.where(finite, new_theta, theta)
            new_ema = torch.where(finite, new_ema, ema)
            if momentum_buffer is not None:
                new_momentum = torch.where(finite, new_momentum, momentum_buffer)
        if found_inf is not None:
            # torch.where instead of an `if`: deciding on the host would need a sync.
            skip = found_inf.reshape(()) != 0
            new_theta = torch.where(skip, theta, new_theta)
            new_ema = torch.where(skip, ema, new_ema)
            if momentum_buffer is not None:
                new_momentum = torch.where(skip, momentum_buffer, new_momentum)
        param.copy_(new_theta)
        ema.copy_(new_ema)
        if momentum_buffer is not None:
            momentum_buffer.copy_(new_momentum)

    def epoch_end(
        self,
        param: torch.Tensor,
        ema: torch.Tensor,
        prev_params: torch.Tensor,
        prev_ema: torch.Tensor,
        *,
        enabled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        delta_theta = param.double() - prev_params.double()
        delta_ema = ema.double() - prev_ema.double()
        sums = torch.stack([torch.dot(delta_theta, delta_theta), torch.dot(delta_theta, delta_ema)])
        _write_if(enabled, prev_params, param)
        _write_if(enabled, prev_ema, ema)
        _zero_if(enabled, ema)
        return _sums_if(enabled, sums)

    def epoch_measure(
        self,
        param: torch.Tensor,
        ema: torch.Tensor,
        prev_params: torch.Tensor,
        prev_ema: torch.Tensor,
        *,
        enabled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        theta = param.double()
        g = ema.double()
        delta_theta = theta - prev_params.double()
        delta_ema = g - prev_ema.double()
        sums = torch.stack(
            [
                torch.dot(delta_theta, delta_theta),
                torch.dot(delta_theta, delta_ema),
                torch.dot(theta, theta),
                torch.dot(g, g),
            ]
        )
        _write_if(enabled, prev_ema, ema)
        _zero_if(enabled, ema)
        return _sums_if(enabled, sums)

    def epoch_commit(
        self,
        param: torch.Tensor,
        prev_params: torch.Tensor,
        rolled_back: torch.Tensor,
        *,
        enabled: torch.Tensor | None = None,
        momentum_buffer: torch.Tensor | None = None,
    ) -> None:
        flag = rolled_back.reshape(())
        if enabled is not None:
            flag = flag & enabled.reshape(())
        torch.where(flag, prev_params, param, out=param)
        _write_if(enabled, prev_params, param)
        zero_momentum_if_rolled_back(momentum_buffer, rolled_back, enabled)


def _write_if(enabled: torch.Tensor | None, target: torch.Tensor, value: torch.Tensor) -> None:
    """target ← value, or (``enabled`` given) only where the flag on the device is set: no host read."""
    if enabled is None:
        target.copy_(value)
    else:
        torch.where(enabled.reshape(()), value, target, out=target)


def _zero_if(enabled: torch.Tensor | None, target: torch.Tensor) -> None:
    """target ← 0, or (``enabled`` given) only where the flag on the device is set: no host read."""
    if enabled is None:
        target.zero_()
    else:
        target.masked_fill_(enabled.reshape(()), 0)


def _sums_if(enabled: torch.Tensor | None, sums: torch.Tensor) -> torch.Tensor:
    """A disabled pass returns zeros, as the fused backends do."""
    return sums if enabled is None else torch.where(enabled.reshape(()), sums, torch.zeros_like(sums))


def unavailable_reason(device: torch.device) -> str | None:
    """The eager backend runs wherever torch does."""
    return None
