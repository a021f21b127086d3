"""The Barzilai–Borwein learning-rate rule (the paper's eq. 11 and 13), written once for every backend.

It runs on device tensors with torch ops only, so closing an epoch never synchronises with the host.
"""

from __future__ import annotations

import torch


def bb_ratio(sums: torch.Tensor, steps: int) -> torch.Tensor:
    """The unbounded BB estimate η = ‖Δθ‖² / (T·|Δθᵀy|) (eq. 11) from ``sums = [‖Δθ‖², Δθᵀy]`` (float64, on
    the device; may be inf or NaN). ``steps`` is T.

    ‖Δθ‖² / (T·|Δθᵀy|) equals the paper's ‖s‖²/|sᵀy| with s = Δθ/T; dividing by T once instead of
    squaring 1/T keeps the numerator from underflowing."""
    return sums[0] / (steps * sums[1].abs())


def epoch_bound(tau: float, epoch: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """τ/(k+2) for epoch ``k`` as a float64 tensor like ``like``; ``epoch`` may be a device tensor (a step captured
    in a CUDA graph counts epochs on the device). Both give the same bits: one float64 division (a Python number
    divided by a tensor would multiply by the tensor's reciprocal instead, rounding twice)."""
    if isinstance(epoch, torch.Tensor):
        return torch.full_like(like, tau) / (epoch + 2).to(torch.float64)
    return torch.full_like(like, tau / (epoch + 2))


def bb_learning_rate(
    sums: torch.Tensor,
    steps: int,
    epoch: int | torch.Tensor,
    tau0: float,
    tau_min: float,
    tau_max: float,
) -> torch.Tensor:
    """Learning rate η̂_{k+1} for the epoch after epoch ``k = epoch`` (k ≥ 1).

    ``sums`` is a float64 tensor of shape (2,): ``[‖Δθ‖², Δθᵀy]`` with Δθ = θ_{k,T} − θ_{k−1,T} and
    y = g_{k,T} − g_{k−1,T}, summed over every parameter. ``steps`` is T, the steps of epoch k.

    η = :func:`bb_ratio` is used when τ_min/(k+2) ≤ η ≤ τ_max/(k+2); anything else, zero, inf and NaN
    included, gives τ_0/(k+2). Returns a float64 0-dim tensor on ``sums.device``.
    """
    ratio = bb_ratio(sums, steps)
    # NaN fails both comparisons and 0 fails the lower bound (tau_min > 0), so they take the fallback.
    inside = (ratio >= epoch_bound(tau_min, epoch, ratio)) & (ratio <= epoch_bound(tau_max, epoch, ratio))
    return torch.where(inside, ratio, epoch_bound(tau0, epoch, ratio))
