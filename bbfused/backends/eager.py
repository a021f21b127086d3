"""The eager backend: plain PyTorch ops, any device. Slow and obviously right: the reference for the others."""

from __future__ import annotations

import torch

from ..average_window import (
    EMA_KEEP,
    EMA_UPDATE,
    WINDOW_CLOSE,
    WINDOW_OPEN,
    EmaMode,
    check_ema_mode,
    window_point,
)
from .base import (
    check_momentum_arguments,
    check_second_moment_arguments,
    finite_nonzero,
    write_share,
    zero_momentum_if_rolled_back,
)


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
        second_moment: torch.Tensor | None = None,
        bias_correction: torch.Tensor | None = None,
        beta2: float = 0.0,
        eps: float = 0.0,
        ema_mode: EmaMode = EMA_UPDATE,
        window_steps: int = 0,
    ) -> None:
        check_momentum_arguments(momentum_buffer, momentum, nesterov)
        check_second_moment_arguments(second_moment, bias_correction, beta2)
        check_ema_mode(ema_mode, momentum_buffer is not None, second_moment is not None, window_steps)
        theta = param.to(ema.dtype)
        d = grad.to(ema.dtype)
        if grad_scale is not None:
            d = d / grad_scale
        if weight_decay != 0:
            d = d + weight_decay * theta
        direction = d
        if second_moment is not None:
            new_second_moment = beta2 * second_moment + (1.0 - beta2) * (d * d)
            direction = d / _denominator(new_second_moment, bias_correction, eps)
        if momentum_buffer is not None:
            # Python floats: torch rounds each to the compute dtype once, as the fused kernels do.
            complement = 1.0 - momentum
            new_momentum = momentum_buffer + complement * (direction - momentum_buffer)
            direction = complement * direction + momentum * new_momentum if nesterov else new_momentum
        new_theta = theta - lr.to(ema.dtype) * direction
        new_ema = ema + beta * (d - ema)
        if nonfinite is not None:
            # With Adam's scaling a non-finite new v counts too (d·d overflowing): it would freeze the element.
            finite = torch.isfinite(d if second_moment is None else new_second_moment)
            skipped = (~finite).sum()
            if found_inf is not None:
                skipped = torch.where(found_inf.reshape(()) != 0, torch.zeros_like(skipped), skipped)
            nonfinite.add_(skipped)
            new_theta = torch.where(finite, new_theta, theta)
            new_ema = torch.where(finite, new_ema, ema)
            if momentum_buffer is not None:
                new_momentum = torch.where(finite, new_momentum, momentum_buffer)
            if second_moment is not None:
                new_second_moment = torch.where(finite, new_second_moment, second_moment)
        if found_inf is not None:
            # torch.where instead of an `if`: deciding on the host would need a sync.
            skip = found_inf.reshape(()) != 0
            new_theta = torch.where(skip, theta, new_theta)
            new_ema = torch.where(skip, ema, new_ema)
            if momentum_buffer is not None:
                new_momentum = torch.where(skip, momentum_buffer, new_momentum)
            if second_moment is not None:
                new_second_moment = torch.where(skip, second_moment, new_second_moment)
        windowed = isinstance(ema_mode, torch.Tensor) or ema_mode in (WINDOW_OPEN, WINDOW_CLOSE)
        if momentum_buffer is not None and second_moment is None and windowed:
            # The window's point: before the step where it opens, after it where it closes.
            opened = window_point(theta, momentum_buffer, lr, momentum, nesterov)
            closed = window_point(new_theta, new_momentum, lr, momentum, nesterov)
            mean = (ema - closed) * (1.0 / (lr * window_steps)).to(ema.dtype)
            if isinstance(ema_mode, torch.Tensor):
                mode = ema_mode.reshape(())
                new_ema = torch.where(mode == WINDOW_OPEN, opened, torch.where(mode == WINDOW_CLOSE, mean, new_ema))
            else:
                new_ema = opened if ema_mode == WINDOW_OPEN else mean
        param.copy_(new_theta)
        if isinstance(ema_mode, torch.Tensor):
            ema.copy_(torch.where(ema_mode.reshape(()) == EMA_KEEP, ema, new_ema))
        elif ema_mode != EMA_KEEP:
            ema.copy_(new_ema)
        if momentum_buffer is not None:
            momentum_buffer.copy_(new_momentum)
        if second_moment is not None:
            second_moment.copy_(new_second_moment)

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
        second_moment: torch.Tensor | None = None,
        bias_correction: torch.Tensor | None = None,
        eps: float = 0.0,
    ) -> torch.Tensor:
        check_second_moment_arguments(second_moment, bias_correction)
        theta = param.double()
        g = ema.double()
        delta_theta = theta - prev_params.double()
        delta_ema = g - prev_ema.double()
        if second_moment is None:
            delta_sq = torch.dot(delta_theta, delta_theta)
        else:
            delta_sq = torch.dot(delta_theta * delta_theta, _denominator(second_moment, bias_correction, eps).double())
        sums = torch.stack(
            [
                delta_sq,
                torch.dot(delta_theta, delta_ema),
                torch.dot(theta, theta),
                torch.dot(g, g),
            ]
        )
        _write_if(enabled, prev_ema, ema)
        _zero_if(enabled, ema)
        return _sums_if(enabled, sums)

    def nonzero_share(
        self,
        grad: torch.Tensor,
        out: torch.Tensor,
        *,
        total: float = 1.0,
        add: bool = False,
        enabled: torch.Tensor | None = None,
        slot: torch.Tensor | None = None,
        skip: torch.Tensor | None = None,
    ) -> None:
        write_share(finite_nonzero(grad), out, add, enabled, total, slot, skip)

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


def _denominator(second_moment: torch.Tensor, bias_correction: torch.Tensor, eps: float) -> torch.Tensor:
    """√(v / c) + ε in v's dtype: the preconditioned step's denominator and the metric of its BB estimate."""
    return correctly_rounded_sqrt(second_moment / bias_correction.to(second_moment.dtype)) + eps


def correctly_rounded_sqrt(x: torch.Tensor) -> torch.Tensor:
    """√x rounded to nearest, as IEEE 754 and the fused kernels take it. torch's CPU sqrt (MKL) is not: it is one
    ulp off for a fifth of float32 values and 1 % of float64 ones, so on the CPU NumPy's takes its place; CUDA's is
    correctly rounded."""
    if x.device.type != "cpu":
        return x.sqrt()
    import numpy

    return torch.from_numpy(numpy.sqrt(x.detach().contiguous().numpy()))


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
