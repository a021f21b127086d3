"""The interface every backend implements: two operations over 1-D contiguous flat buffers.

A backend knows nothing about parameters, groups or epochs; the optimizer hands it flat slices of the
buffers in ``bbfused.buffers`` and applies the BB rule (``bbfused.rule``) to what ``epoch_end`` returns.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..average_window import EMA_UPDATE, EmaMode


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and what to do."""


class Backend(Protocol):
    """One implementation of the fused step and epoch end.

    A backend may also set ``weight_decay_block`` (an int): its step then takes, instead of a number, a float64
    table of each block's weight decay (that many elements a block), and the buffers of several groups run as one
    (``bbfused.buffer_runs``)."""

    name: str

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
        """One SGD step with L2 weight decay and the gradient EMA, in place, over n elements.

        param, grad: (n,) in the parameter dtype; ema: (n,) float32 (float64 for float64 parameters).
        lr: float64 0-dim tensor on the device. grad_scale: float32 0-dim/1-element tensor, the GradScaler
        scale the gradient is divided by; found_inf: float32 tensor, non-zero means skip (write nothing).
        d = grad/scale + λ·θ;  θ ← θ − lr·d;  g ← g + β·(d − g).
        nonfinite: an int64 0-dim tensor on the device, or None (the paper's step). Given, an element whose d is
        not finite keeps θ and g, and the count of such elements is added to it (on the device, no sync).

        momentum_buffer: (n,) in the EMA's dtype, or None (the step above). Given, heavy-ball momentum μ in its
        EMA form, so that lr stays the effective rate: m ← m + (1 − μ)·(d − m), then θ ← θ − lr·m, or with
        ``nesterov`` θ ← θ − lr·((1 − μ)·d + μ·m) with the new m. 1 − μ is taken in float64 and rounded to the
        compute dtype once, as μ is. A skipped element (non-finite d, or found_inf) keeps m too. Without a
        buffer, momentum must be 0 and nesterov false.

        second_moment: (n,) in the EMA's dtype, or None. Given (``bbfused.preconditioner``), the step is Adam's
        per-element scaling of d: v ← β₂·v + (1 − β₂)·(d·d), u = d / (√(v / c) + ε) with c = ``bias_correction``
        (a float64 0-dim device tensor, 1 − β₂ᵗ for this step) rounded to the compute dtype once, as β₂, 1 − β₂
        (taken in float64) and ε are; the momentum and θ then step along u in place of d. g still averages d. A
        skipped element keeps v too, and with ``nonfinite`` an element whose new v is not finite (d·d overflowing) is
        skipped and counted as one whose d is not.

        ema_mode (``bbfused.average_window``): EMA_UPDATE is the g update above; EMA_KEEP neither reads nor writes g;
        with a momentum_buffer and no second_moment, WINDOW_OPEN writes g ← θ − c·η·m (θ and m before this step, c
        ``point_coefficient(momentum, nesterov)`` in float64, then c and η each rounded to the compute dtype and
        multiplied) and WINDOW_CLOSE writes g ← (g − (θ − c·η·m))·s with θ and m after this step (kept where it is
        skipped) and s = 1 / (lr·``window_steps``) taken in float64 and rounded once: the mean of d over the
        window's steps. An int32 device tensor holding one of them is read on the device (the device clock's step);
        a mode that can close a window needs ``window_steps`` >= 2.
        """
        ...

    def epoch_end(
        self,
        param: torch.Tensor,
        ema: torch.Tensor,
        prev_params: torch.Tensor,
        prev_ema: torch.Tensor,
        *,
        enabled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Epoch-end pass over n elements; returns float64 (2,) ``[‖θ − θ_prev‖², (θ − θ_prev)ᵀ(g − g_prev)]``.

        In the same pass: prev_params ← θ, prev_ema ← g, g ← 0. Deterministic: the same inputs give the
        same bits. prev_params has the parameter dtype, prev_ema the ema dtype.

        ``enabled`` (every pass): None runs the pass; a bool 0-dim tensor on the device runs it only when true,
        read there (no host sync): false writes nothing and returns zeros. A step captured in a CUDA graph
        carries its epoch end this way (``BB(capturable=True)``).
        """
        ...

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
        """The safeguarded epoch end's first pass: float64 (4,) ``[‖θ − θ_prev‖², (θ − θ_prev)ᵀ(g − g_prev),
        ‖θ‖², ‖g‖²]`` (the last two may be summed in the state dtype); in the same pass prev_ema ← g, g ← 0.
        prev_params is not written: a rollback restores it. Deterministic.

        With ``second_moment`` (v) the first sum is taken in the preconditioner's metric: Σ (Δθ·Δθ)·D in float64,
        D = √(v / c) + ε computed in the state dtype as the step computes its denominator (c =
        ``bias_correction``)."""
        ...

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
        """out ← (out if ``add`` else 0) + c / ``total``, c how many of ``grad``'s values are finite and not exactly
        zero (a value the step skips for not being finite is no unit's life), divided in float64. ``out``: a float64
        0-dim tensor on grad's device. ``enabled`` as in epoch_end: false reads nothing and leaves out as it is. With
        ``slot`` (a bool 0-dim tensor on the device) ``out`` is a (2,) tensor, the count runs where ``enabled`` or
        ``slot`` is set and goes to out[1] where ``slot`` is, else to out[0]: a period's two counts (the step before
        its last, the last) as one gated launch per step. ``skip``: GradScaler's found_inf (a float32 tensor of one
        element on the device); non-zero, nothing is read or written (a skipped step's gradient is not the
        network's). A read only: the rate control measures the share of gradient values that are not zero, to see
        units that stopped (``bbfused.control.live_gradients``)."""
        ...

    def epoch_commit(
        self,
        param: torch.Tensor,
        prev_params: torch.Tensor,
        rolled_back: torch.Tensor,
        *,
        enabled: torch.Tensor | None = None,
        momentum_buffer: torch.Tensor | None = None,
    ) -> None:
        """The second pass, a copy: prev_params ← θ, or θ ← prev_params when ``rolled_back`` (a bool 0-dim tensor
        on the device, read there: no host sync). ``momentum_buffer`` (the buffer's, or None) is zeroed when rolled
        back: the rolled-back period's direction must not carry on from the restored weights."""
        ...


def check_momentum_arguments(momentum_buffer: torch.Tensor | None, momentum: float, nesterov: bool) -> None:
    """Raise when a momentum is asked for without a buffer to keep it in (it would be silently ignored)."""
    if momentum_buffer is None and (momentum != 0 or nesterov):
        raise ValueError(
            f"step: momentum={momentum!r}, nesterov={nesterov!r} needs a momentum_buffer (a flat buffer in the EMA's "
            f"dtype, FlatBuffer(momentum=True)); without one pass momentum=0.0 and nesterov=False"
        )


def zero_momentum_if_rolled_back(
    momentum_buffer: torch.Tensor | None, rolled_back: torch.Tensor, enabled: torch.Tensor | None
) -> None:
    """m ← 0 where the period was rolled back (and ``enabled``), through a mask on the device: no host read of either
    flag. On the CPU reading it costs no sync, and skips a pass over the buffer that a mask that is not set still
    makes."""
    if momentum_buffer is None:
        return
    restart = rolled_back.reshape(()) if enabled is None else rolled_back.reshape(()) & enabled.reshape(())
    if momentum_buffer.device.type != "cpu" or bool(restart):
        momentum_buffer.masked_fill_(restart, 0)


def finite_nonzero(grad: torch.Tensor) -> torch.Tensor:
    """How many of ``grad``'s values are finite and not zero (nonzero_share's count, with torch ops)."""
    return torch.count_nonzero((grad != 0) & torch.isfinite(grad))


def write_share(
    count: torch.Tensor,
    out: torch.Tensor,
    add: bool,
    enabled: torch.Tensor | None,
    total: float = 1.0,
    slot: torch.Tensor | None = None,
    skip: torch.Tensor | None = None,
) -> None:
    """nonzero_share's write with torch ops (no host read of a flag)."""
    share = count.to(torch.float64) / total
    if slot is None:
        value = out + share if add else share
        active = None if enabled is None else enabled.reshape(())
    else:
        chosen = slot.reshape(())
        target = torch.where(chosen, out[1], out[0])
        total_share = target + share if add else share
        value = torch.where(chosen, torch.stack([out[0], total_share]), torch.stack([total_share, out[1]]))
        active = chosen if enabled is None else chosen | enabled.reshape(())
    if skip is not None:
        kept = skip.reshape(()) == 0
        active = kept if active is None else active & kept
    if active is None:
        out.copy_(value)
    else:
        torch.where(active, value, out, out=out)


def check_second_moment_arguments(
    second_moment: torch.Tensor | None, bias_correction: torch.Tensor | None, beta2: float | None = None
) -> None:
    """Raise when a second moment comes without its bias correction (the step could not scale by it), or, for the
    step (``beta2`` given), with a β₂ outside (0, 1), which would not average the squares (0, the argument's
    default, makes v = d² and 0/0 where d = 0)."""
    if second_moment is None:
        return
    if bias_correction is None:
        raise ValueError(
            "a second_moment needs its bias_correction (a float64 0-dim tensor, 1 - beta2**t, on the buffer's "
            "device); pass both, or neither for BB's SGD step"
        )
    if beta2 is not None and not 0.0 < beta2 < 1.0:
        raise ValueError(
            f"a second_moment needs beta2 in (0, 1), got {beta2!r}; pass bbfused.preconditioner.BETA2 (Adam's 0.999)"
        )
