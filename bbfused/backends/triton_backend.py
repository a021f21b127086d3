"""The Triton backend: the step and the epoch end, each one kernel launch per flat buffer (CUDA).

Layout after Liger-Kernel's ops: the ``@triton.jit`` kernels first, then the thin ``TritonBackend`` wrapper
that checks its inputs and launches them. On CPU tensors the kernels run only through the Triton
interpreter (``TRITON_INTERPRET=1`` set before triton is imported), which is how the tests run without a GPU.

Nothing that changes between launches is a ``tl.constexpr``: the learning rate, grad scale and found-inf
flag are read through pointers, weight decay and beta are float64 scalars (floats are never specialized),
and the element count is exempt from Triton's integer specialization (``do_not_specialize``). The
constexprs are what a launch is, not the values it uses: which optional tensors are present, whether
offsets need 64 bits, the block size. So one kernel is compiled per dtype and flag combination, no more.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError as error:
    raise ImportError(f"{error}; the triton backend needs the triton package: pip install triton") from error

from ..average_window import EMA_UPDATE, EmaMode, check_ema_mode, point_coefficient
from ..buffers import state_dtype
from .base import check_momentum_arguments, check_second_moment_arguments

# Block size and warps, fixed for both kernels (no autotuning: it would time launches at first use and
# keep one configuration per length). Both kernels stream: each element is loaded and stored once, so what
# matters is full-width accesses and enough of them in flight. 1024 elements over 4 warps gives each
# thread 8 consecutive elements: two 16-byte accesses per fp32 buffer, one per 16-bit buffer (checked in
# the PTX by the tests), and a ResNet-50 buffer (25.6M elements) 25k programs, so the partial last wave
# is a small fraction. It is the Triton tutorials' element-wise configuration; benchmarks/gpu_check.py
# measures it against 512-4096 elements and 8 warps (pending: no GPU in the session that wrote this).
BLOCK_SIZE = 1024
NUM_WARPS = 4
# The step's compile options. No fused multiply-add: contracting a·b + c into one rounding would change the bits,
# and every backend gives the eager reference's (on CPU the interpreter computes op by op anyway).
STEP_OPTIONS = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}
# The step of 16-bit parameters addresses its block as rows of this many elements. On a flat block the compiler gives
# the 16-bit accesses 8 elements a thread and the float32 EMA's 4, and converts between the two layouts through shared
# memory with barriers; rows of 4 give every access one layout (64-bit 16-bit accesses, 128-bit float32 ones) and no
# shared memory (tests/test_triton_backend.py). Which is faster is for a GPU to time (benchmarks/gpu_check.py).
STEP_ROW = {torch.bfloat16: 4, torch.float16: 4}
# The epoch-end passes run on at most this many programs, each looping over every EPOCH_PROGRAMS-th block: a captured
# step launches them every step, gated by a flag, and a grid that scaled with the buffer (24,906 blocks on ResNet-50)
# would spend its time starting programs that read the flag and exit. 1024 programs of 4 warps still fill an H200
# (132 SMs) several times over for the passes that run.
EPOCH_PROGRAMS = 1024
# The gradient share (the dead-unit test's count) runs as one program up to this many elements: one launch, two steps
# a period. A larger buffer is counted by up to EPOCH_PROGRAMS programs and their sums added by a second launch, so
# that its count is not one multiprocessor's serial read.
SHARE_PROGRAM_LIMIT = 1 << 20
# Offsets pid * BLOCK + i are int32 unless the last block's end passes this; int64 costs registers and
# address arithmetic, so it is used only when needed: for buffers of more than 2**31 elements.
INT32_INDEX_LIMIT = 2**31


@triton.jit
def _block_span(block, USE_INT64: tl.constexpr, BLOCK: tl.constexpr):
    """Block ``block``'s first element and its offsets; int64 when the buffer is too long for int32."""
    if USE_INT64:
        block = tl.cast(block, tl.int64)  # int32 block * BLOCK would overflow past 2**31 elements
    start = block * BLOCK
    return start, start + tl.arange(0, BLOCK)


@triton.jit
def _load(pointers, mask):
    """Masked-off lanes read as zero; ``mask=None`` (a full block) loads without a mask."""
    if mask is None:
        values = tl.load(pointers)
    else:
        values = tl.load(pointers, mask=mask, other=0.0)
    return values


@triton.jit
def _load_if(pointers, mask, flag):
    """_load where the scalar ``flag`` holds; where it does not, no memory is read and the values are zero."""
    if mask is None:
        values = tl.load(pointers, mask=flag, other=0.0)
    else:
        values = tl.load(pointers, mask=mask & flag, other=0.0)
    return values


@triton.jit
def _store_if(pointers, values, mask, flag):
    """Store where the scalar ``flag`` holds (and ``mask``, None: the whole block); nothing is written elsewhere."""
    if mask is None:
        tl.store(pointers, values, mask=flag)
    else:
        tl.store(pointers, values, mask=mask & flag)


@triton.jit
def _window_point(theta, m, lr_ptr, point_coefficient, compute):
    """The window's point θ − c·η·m, c·η rounded once from c's and η's rounded values (``window_point``)."""
    return theta - (tl.load(lr_ptr).to(compute) * tl.full((), point_coefficient, compute)) * m


@triton.jit
def _window_scale(lr_ptr, window_steps, compute):
    """1 / (η·n) taken in float64 and rounded once to ``compute``: what the window's point difference is scaled by."""
    return (1.0 / (tl.load(lr_ptr) * window_steps.to(tl.float64))).to(compute)


@triton.jit
def _divide(numerator, denominator):
    """numerator / denominator rounded to nearest, as torch divides (Triton's fp32 ``/`` is approximate)."""
    if numerator.dtype == tl.float32:
        quotient = tl.math.div_rn(numerator, denominator)
    else:
        quotient = numerator / denominator
    return quotient


@triton.jit
def _rounded_sqrt(x):
    """√x rounded to nearest, as eager's reference takes it (Triton's fp32 ``tl.sqrt`` is approximate on a GPU; its
    fp64 one is not)."""
    if x.dtype == tl.float32:
        root = tl.sqrt_rn(x)
    else:
        root = tl.sqrt(x)
    return root


@triton.jit
def _denominator(second_moment, bias_correction, eps):
    """√(v / c) + ε in v's dtype, each operation rounded once: the preconditioned step's denominator, and the metric
    the measuring pass sums Δθ² in (the two must agree bit for bit, as eager's ``_denominator``)."""
    return _rounded_sqrt(_divide(second_moment, bias_correction)) + eps


@triton.jit
def _step_block(
    param_ptr,
    grad_ptr,
    ema_ptr,
    lr_ptr,
    grad_scale_ptr,
    nonfinite_ptr,
    momentum_ptr,
    second_moment_ptr,
    bias_correction_ptr,
    ema_mode_ptr,
    weight_decay,
    beta,
    momentum,
    beta2,
    eps,
    point_coefficient,
    window_steps,
    offsets,
    mask,
    HAS_SCALE: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    HAS_SECOND_MOMENT: tl.constexpr,
    EMA_WINDOW: tl.constexpr,
):
    """The step over the elements ``offsets`` (``mask``: which of them exist; None: all). SKIP_NONFINITE: an
    element whose d is not finite keeps θ, g (and m, v), and is counted into *nonfinite_ptr. HAS_SECOND_MOMENT: d
    is scaled to u = d / (√(v / c) + ε) with v ← β₂·v + (1 − β₂)·d², and the momentum and θ step along u.
    HAS_MOMENTUM: θ steps along the momentum buffer m ← m + (1 − μ)·(u − m), or (NESTEROV) along (1 − μ)·u + μ·m.
    EMA_WINDOW (with momentum): the mode at ema_mode_ptr says whether g is updated, left alone (neither read nor
    written), set to the window's point or turned into the window's mean (``bbfused.average_window``)."""
    compute = ema_ptr.dtype.element_ty
    theta = _load(param_ptr + offsets, mask).to(compute)
    d = _load(grad_ptr + offsets, mask).to(compute)
    if EMA_WINDOW:
        ema_mode = tl.load(ema_mode_ptr)
        ema = _load_if(ema_ptr + offsets, mask, (ema_mode == 0) | (ema_mode == 3))  # EMA_UPDATE, WINDOW_CLOSE read g
    else:
        ema = _load(ema_ptr + offsets, mask)
    if HAS_SCALE:
        d = _divide(d, tl.load(grad_scale_ptr).to(compute))
    # tl.full converts the float64 scalars to the compute dtype (rounding once, like torch); it also
    # keeps their float64 value under the interpreter, which would otherwise round Python floats to fp32.
    d = d + tl.full((), weight_decay, compute) * theta
    direction = d
    if HAS_SECOND_MOMENT:
        v = _load(second_moment_ptr + offsets, mask)
        # 1 − β₂ in float64, then rounded once, as eager's Python float is.
        new_v = tl.full((), beta2, compute) * v + tl.full((), 1.0 - beta2, compute) * (d * d)
        correction = tl.load(bias_correction_ptr).to(compute)  # on the device: a captured step sees each step's c
        direction = _divide(d, _denominator(new_v, correction, tl.full((), eps, compute)))
    if HAS_MOMENTUM:
        m = _load(momentum_ptr + offsets, mask)
        if EMA_WINDOW:
            opened = _window_point(theta, m, lr_ptr, point_coefficient, compute)  # WINDOW_OPEN: before this step
        complement = tl.full((), 1.0 - momentum, compute)  # 1 − μ in float64, then rounded once, as eager's
        new_m = m + complement * (direction - m)
        if NESTEROV:
            direction = complement * direction + tl.full((), momentum, compute) * new_m
        else:
            direction = new_m
    new_theta = theta - tl.load(lr_ptr).to(compute) * direction
    new_ema = ema + tl.full((), beta, compute) * (d - ema)  # g averages the raw d, preconditioned or not
    if SKIP_NONFINITE:
        # inf - inf and NaN - NaN are NaN. With Adam's scaling a non-finite new v counts too (d non-finite, or d·d
        # overflowing): an infinite v would freeze the element for good.
        checked = d
        if HAS_SECOND_MOMENT:
            checked = new_v
        finite = (checked - checked) == 0
        new_theta = tl.where(finite, new_theta, theta)
        new_ema = tl.where(finite, new_ema, ema)
        if HAS_MOMENTUM:
            new_m = tl.where(finite, new_m, m)
        if HAS_SECOND_MOMENT:
            new_v = tl.where(finite, new_v, v)
        skipped = tl.sum(tl.where(finite, 0, 1).to(tl.int64), axis=None)
        if skipped != 0:
            tl.atomic_add(nonfinite_ptr, skipped)
    tl.store(param_ptr + offsets, new_theta.to(param_ptr.dtype.element_ty), mask=mask)
    if EMA_WINDOW:
        closed = _window_point(new_theta, new_m, lr_ptr, point_coefficient, compute)  # WINDOW_CLOSE: after it
        mean = (ema - closed) * _window_scale(lr_ptr, window_steps, compute)
        new_ema = tl.where(ema_mode == 2, opened, tl.where(ema_mode == 3, mean, new_ema))
        _store_if(ema_ptr + offsets, new_ema, mask, ema_mode != 1)  # EMA_KEEP writes nothing
    else:
        tl.store(ema_ptr + offsets, new_ema, mask=mask)
    if HAS_MOMENTUM:
        tl.store(momentum_ptr + offsets, new_m, mask=mask)
    if HAS_SECOND_MOMENT:
        tl.store(second_moment_ptr + offsets, new_v, mask=mask)


@triton.jit
def _step_program(
    param_ptr,
    grad_ptr,
    ema_ptr,
    lr_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    nonfinite_ptr,
    momentum_ptr,
    weight_decay_ptr,
    second_moment_ptr,
    bias_correction_ptr,
    ema_mode_ptr,
    n_elements,
    weight_decay,
    beta,
    momentum,
    beta2,
    eps,
    point_coefficient,
    window_steps,
    HAS_SCALE: tl.constexpr,
    HAS_WEIGHT_DECAY_TABLE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    HAS_SECOND_MOMENT: tl.constexpr,
    EMA_WINDOW: tl.constexpr,
    USE_INT64: tl.constexpr,
    BLOCK: tl.constexpr,
    ROW: tl.constexpr,
):
    """One program of a step kernel (_step_kernel, _preconditioned_step_kernel): the step over its block, or with
    found_inf ≠ 0 no access at all (but g's write where the window opens or closes, from θ and m as they stay).
    HAS_WEIGHT_DECAY_TABLE: λ is this block's entry of the float64 table (a run of several groups' buffers).
    ROW > 1: the block as (BLOCK / ROW, ROW) offsets (see STEP_ROW)."""
    start, offsets = _block_span(tl.program_id(0), USE_INT64, BLOCK)
    if ROW > 1:
        offsets = start + tl.arange(0, BLOCK // ROW)[:, None] * ROW + tl.arange(0, ROW)[None, :]
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0:
            if EMA_WINDOW:
                ema_mode = tl.load(ema_mode_ptr)
                ends = (ema_mode == 2) | (ema_mode == 3)
                inside = offsets < n_elements
                compute = ema_ptr.dtype.element_ty
                theta = _load_if(param_ptr + offsets, inside, ends).to(compute)
                m = _load_if(momentum_ptr + offsets, inside, ends)
                point = _window_point(theta, m, lr_ptr, point_coefficient, compute)
                ema = _load_if(ema_ptr + offsets, inside, ema_mode == 3)
                mean = (ema - point) * _window_scale(lr_ptr, window_steps, compute)
                _store_if(ema_ptr + offsets, tl.where(ema_mode == 2, point, mean), inside, ends)
            return
    if HAS_WEIGHT_DECAY_TABLE:
        weight_decay = tl.load(weight_decay_ptr + tl.program_id(0))
    # Full blocks go unmasked: Triton vectorizes an access only where it can prove the mask constant over
    # the vector, which an unspecialized n_elements does not allow. (n - start, not start + BLOCK: no overflow.)
    if n_elements - start >= BLOCK:
        _step_block(
            param_ptr, grad_ptr, ema_ptr, lr_ptr, grad_scale_ptr, nonfinite_ptr, momentum_ptr, second_moment_ptr,
            bias_correction_ptr, ema_mode_ptr, weight_decay, beta, momentum, beta2, eps, point_coefficient,
            window_steps, offsets, None, HAS_SCALE,
            SKIP_NONFINITE, HAS_MOMENTUM, NESTEROV, HAS_SECOND_MOMENT, EMA_WINDOW,
        )  # fmt: skip
    else:
        mask = offsets < n_elements
        _step_block(
            param_ptr, grad_ptr, ema_ptr, lr_ptr, grad_scale_ptr, nonfinite_ptr, momentum_ptr, second_moment_ptr,
            bias_correction_ptr, ema_mode_ptr, weight_decay, beta, momentum, beta2, eps, point_coefficient,
            window_steps, offsets, mask, HAS_SCALE,
            SKIP_NONFINITE, HAS_MOMENTUM, NESTEROV, HAS_SECOND_MOMENT, EMA_WINDOW,
        )  # fmt: skip


@triton.jit(do_not_specialize=["n_elements", "window_steps"])
def _step_kernel(
    param_ptr,
    grad_ptr,
    ema_ptr,
    lr_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    nonfinite_ptr,
    momentum_ptr,
    weight_decay_ptr,
    n_elements,
    weight_decay: tl.float64,
    beta: tl.float64,
    momentum: tl.float64,
    ema_mode_ptr,
    point_coefficient: tl.float64,
    window_steps,
    HAS_SCALE: tl.constexpr,
    HAS_WEIGHT_DECAY_TABLE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    EMA_WINDOW: tl.constexpr,
    USE_INT64: tl.constexpr,
    BLOCK: tl.constexpr,
    ROW: tl.constexpr,
):
    """d = grad/scale + λ·θ;  θ ← θ − lr·d;  g ← g + β·(d − g), over one block; found_inf ≠ 0: no access.
    With HAS_MOMENTUM, θ steps along m ← m + (1 − μ)·(d − m) (NESTEROV: along (1 − μ)·d + μ·m) instead of d, and
    with EMA_WINDOW the int32 at ema_mode_ptr says how g is treated (``bbfused.average_window``).

    Arithmetic in the EMA dtype (fp32, or fp64 for fp64 parameters). Memory traffic per element: one
    read of θ, grad and g, one write of θ and g; with momentum also one read and one write of m. A step that leaves
    g alone (EMA_WINDOW) does not touch it; one that opens the window writes g without reading it. ``window_steps``
    (n) and ``point_coefficient`` (c) are the window's (base.Backend.step).
    """
    _step_program(
        param_ptr, grad_ptr, ema_ptr, lr_ptr, grad_scale_ptr, found_inf_ptr, nonfinite_ptr, momentum_ptr,
        weight_decay_ptr, None, None, ema_mode_ptr, n_elements, weight_decay, beta, momentum, 0.0, 0.0,
        point_coefficient, window_steps, HAS_SCALE,
        HAS_WEIGHT_DECAY_TABLE, HAS_FOUND_INF, SKIP_NONFINITE, HAS_MOMENTUM, NESTEROV, False, EMA_WINDOW, USE_INT64,
        BLOCK, ROW,
    )  # fmt: skip


# The preconditioned step is a kernel of its own rather than a flag of _step_kernel: its two pointers and two scalars
# would change _step_kernel's signature, which the specialization and compiled-code tests pin; the code is the same
# _step_program with HAS_SECOND_MOMENT set.
@triton.jit(do_not_specialize=["n_elements"])
def _preconditioned_step_kernel(
    param_ptr,
    grad_ptr,
    ema_ptr,
    lr_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    nonfinite_ptr,
    momentum_ptr,
    weight_decay_ptr,
    n_elements,
    weight_decay: tl.float64,
    beta: tl.float64,
    momentum: tl.float64,
    second_moment_ptr,
    bias_correction_ptr,
    beta2: tl.float64,
    eps: tl.float64,
    HAS_SCALE: tl.constexpr,
    HAS_WEIGHT_DECAY_TABLE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    USE_INT64: tl.constexpr,
    BLOCK: tl.constexpr,
    ROW: tl.constexpr,
):
    """_step_kernel with Adam's per-element scaling: v ← β₂·v + (1 − β₂)·d², u = d / (√(v / c) + ε), and the
    momentum and θ step along u where _step_kernel's step along d; g still averages d. c (1 − β₂ᵗ) is read at
    bias_correction_ptr (float64), so a captured step takes each step's. Adds one read and one write of v per
    element."""
    _step_program(
        param_ptr, grad_ptr, ema_ptr, lr_ptr, grad_scale_ptr, found_inf_ptr, nonfinite_ptr, momentum_ptr,
        weight_decay_ptr, second_moment_ptr, bias_correction_ptr, None, n_elements, weight_decay, beta, momentum, beta2,
        eps, 0.0, 0, HAS_SCALE, HAS_WEIGHT_DECAY_TABLE, HAS_FOUND_INF, SKIP_NONFINITE, HAS_MOMENTUM, NESTEROV, True,
        False, USE_INT64, BLOCK, ROW,
    )  # fmt: skip


@triton.jit
def _enabled(enabled_ptr, HAS_ENABLED: tl.constexpr):
    """Whether an epoch-end launch does its work: always, or (HAS_ENABLED) when the flag on the device is set, so
    that a step captured in a CUDA graph can carry the epoch end and replay it only at the epoch's last step."""
    if HAS_ENABLED:
        go = tl.load(enabled_ptr) != 0
    else:
        go = tl.full((), 1, tl.int1)
    return go


@triton.jit
def _zero_partials(partials_ptr, row_stride, ROWS: tl.constexpr):
    """A disabled launch's slots read as zeros, so the partials need no fill kernel before the launch."""
    pid = tl.program_id(0)
    for row in tl.static_range(ROWS):
        tl.store(partials_ptr + row * row_stride + pid, tl.full((), 0.0, tl.float64))


@triton.jit
def _epoch_end_block(param_ptr, ema_ptr, prev_params_ptr, prev_ema_ptr, offsets, mask):
    """The epoch end over the elements ``offsets`` (``mask`` as in _step_block); returns their two sums."""
    theta = _load(param_ptr + offsets, mask)
    ema = _load(ema_ptr + offsets, mask)
    delta_theta = theta.to(tl.float64) - _load(prev_params_ptr + offsets, mask).to(tl.float64)
    delta_ema = ema.to(tl.float64) - _load(prev_ema_ptr + offsets, mask).to(tl.float64)
    tl.store(prev_params_ptr + offsets, theta, mask=mask)
    tl.store(prev_ema_ptr + offsets, ema, mask=mask)
    tl.store(ema_ptr + offsets, tl.zeros_like(ema), mask=mask)
    return tl.sum(delta_theta * delta_theta, axis=0), tl.sum(delta_theta * delta_ema, axis=0)


@triton.jit(do_not_specialize=["n_elements", "row_stride"])
def _epoch_end_kernel(
    param_ptr,
    ema_ptr,
    prev_params_ptr,
    prev_ema_ptr,
    partials_ptr,
    enabled_ptr,
    n_elements,
    row_stride,
    HAS_ENABLED: tl.constexpr,
    USE_INT64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """This program's blocks' ‖Δθ‖² and Δθᵀy (every EPOCH_PROGRAMS-th block, added in order) into slots [pid] and
    [row_stride + pid]; θ_prev ← θ, g_prev ← g, g ← 0.

    The differences and sums are float64 (the eager reference's precision); each program writes its own
    slots, so the result does not depend on scheduling (no atomics). With HAS_ENABLED, a zero flag at
    enabled_ptr makes the launch write zeros into its slots and nothing else (a captured step's epoch end, see
    _enabled).
    """
    if _enabled(enabled_ptr, HAS_ENABLED):
        pid = tl.program_id(0)
        sq_norm = tl.full((), 0.0, tl.float64)
        dot = tl.full((), 0.0, tl.float64)
        for block in range(pid, tl.cdiv(n_elements, BLOCK), tl.num_programs(0)):
            start, offsets = _block_span(block, USE_INT64, BLOCK)
            if n_elements - start >= BLOCK:  # as in _step_kernel
                a, b = _epoch_end_block(param_ptr, ema_ptr, prev_params_ptr, prev_ema_ptr, offsets, None)
            else:
                mask = offsets < n_elements
                a, b = _epoch_end_block(param_ptr, ema_ptr, prev_params_ptr, prev_ema_ptr, offsets, mask)
            sq_norm += a
            dot += b
        tl.store(partials_ptr + pid, sq_norm)
        tl.store(partials_ptr + row_stride + pid, dot)
    else:
        _zero_partials(partials_ptr, row_stride, 2)


@triton.jit
def _epoch_measure_block(
    param_ptr,
    ema_ptr,
    prev_params_ptr,
    prev_ema_ptr,
    second_moment_ptr,
    bias_correction,
    eps,
    offsets,
    mask,
    HAS_SECOND_MOMENT: tl.constexpr,
):
    """The safeguarded epoch end's first pass over ``offsets``: its four float64 sums; g_prev ← g, g ← 0.
    HAS_SECOND_MOMENT: the first sum is Σ Δθ²·(√(v / c) + ε), the metric taken in v's dtype as the step takes it."""
    theta = _load(param_ptr + offsets, mask).to(tl.float64)
    ema = _load(ema_ptr + offsets, mask)
    ema64 = ema.to(tl.float64)
    delta_theta = theta - _load(prev_params_ptr + offsets, mask).to(tl.float64)
    delta_ema = ema64 - _load(prev_ema_ptr + offsets, mask).to(tl.float64)
    tl.store(prev_ema_ptr + offsets, ema, mask=mask)
    tl.store(ema_ptr + offsets, tl.zeros_like(ema), mask=mask)
    delta_sq = delta_theta * delta_theta
    if HAS_SECOND_MOMENT:
        # Masked-off lanes read v = 0 and Δθ = 0: their term is 0 for any c > 0.
        metric = _denominator(_load(second_moment_ptr + offsets, mask), bias_correction, eps)
        delta_sq = delta_sq * metric.to(tl.float64)
    return (
        tl.sum(delta_sq, axis=0),
        tl.sum(delta_theta * delta_ema, axis=0),
        tl.sum(theta * theta, axis=0),
        tl.sum(ema64 * ema64, axis=0),
    )


@triton.jit
def _epoch_measure_program(
    param_ptr,
    ema_ptr,
    prev_params_ptr,
    prev_ema_ptr,
    partials_ptr,
    enabled_ptr,
    second_moment_ptr,
    bias_correction_ptr,
    n_elements,
    row_stride,
    eps,
    HAS_ENABLED: tl.constexpr,
    HAS_SECOND_MOMENT: tl.constexpr,
    USE_INT64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program of a measuring kernel (_epoch_measure_kernel, _preconditioned_measure_kernel)."""
    if _enabled(enabled_ptr, HAS_ENABLED):
        pid = tl.program_id(0)
        correction = None
        epsilon = None
        if HAS_SECOND_MOMENT:
            correction = tl.load(bias_correction_ptr).to(ema_ptr.dtype.element_ty)
            epsilon = tl.full((), eps, ema_ptr.dtype.element_ty)
        a = tl.full((), 0.0, tl.float64)
        b = tl.full((), 0.0, tl.float64)
        c = tl.full((), 0.0, tl.float64)
        d = tl.full((), 0.0, tl.float64)
        for block in range(pid, tl.cdiv(n_elements, BLOCK), tl.num_programs(0)):
            start, offsets = _block_span(block, USE_INT64, BLOCK)
            if n_elements - start >= BLOCK:  # as in _step_kernel
                sums = _epoch_measure_block(
                    param_ptr, ema_ptr, prev_params_ptr, prev_ema_ptr, second_moment_ptr, correction, epsilon, offsets,
                    None, HAS_SECOND_MOMENT,
                )  # fmt: skip
            else:
                mask = offsets < n_elements
                sums = _epoch_measure_block(
                    param_ptr, ema_ptr, prev_params_ptr, prev_ema_ptr, second_moment_ptr, correction, epsilon, offsets,
                    mask, HAS_SECOND_MOMENT,
                )  # fmt: skip
            a += sums[0]
            b += sums[1]
            c += sums[2]
            d += sums[3]
        tl.store(partials_ptr + pid, a)
        tl.store(partials_ptr + row_stride + pid, b)
        tl.store(partials_ptr + 2 * row_stride + pid, c)
        tl.store(partials_ptr + 3 * row_stride + pid, d)
    else:
        _zero_partials(partials_ptr, row_stride, 4)


@triton.jit(do_not_specialize=["n_elements", "row_stride"])
def _epoch_measure_kernel(
    param_ptr,
    ema_ptr,
    prev_params_ptr,
    prev_ema_ptr,
    partials_ptr,
    enabled_ptr,
    n_elements,
    row_stride,
    HAS_ENABLED: tl.constexpr,
    USE_INT64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """This program's blocks' ‖Δθ‖², Δθᵀy, ‖θ‖², ‖g‖² into slots [k · row_stride + pid] (no atomics: deterministic);
    g_prev ← g, g ← 0. θ_prev is left for the second pass (a rollback restores it). HAS_ENABLED: as in
    _epoch_end_kernel."""
    _epoch_measure_program(
        param_ptr, ema_ptr, prev_params_ptr, prev_ema_ptr, partials_ptr, enabled_ptr, None, None, n_elements,
        row_stride, 0.0, HAS_ENABLED, False, USE_INT64, BLOCK,
    )  # fmt: skip


# A kernel of its own, as _preconditioned_step_kernel is: _epoch_measure_kernel's signature stays as the tests pin it.
@triton.jit(do_not_specialize=["n_elements", "row_stride"])
def _preconditioned_measure_kernel(
    param_ptr,
    ema_ptr,
    prev_params_ptr,
    prev_ema_ptr,
    partials_ptr,
    enabled_ptr,
    n_elements,
    row_stride,
    second_moment_ptr,
    bias_correction_ptr,
    eps: tl.float64,
    HAS_ENABLED: tl.constexpr,
    USE_INT64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """_epoch_measure_kernel with the first sum in the preconditioner's metric: Σ Δθ²·(√(v / c) + ε), c (1 − β₂ᵗ)
    read at bias_correction_ptr. v is read, not written."""
    _epoch_measure_program(
        param_ptr, ema_ptr, prev_params_ptr, prev_ema_ptr, partials_ptr, enabled_ptr, second_moment_ptr,
        bias_correction_ptr, n_elements, row_stride, eps, HAS_ENABLED, True, USE_INT64, BLOCK,
    )  # fmt: skip


@triton.jit
def _count_flags(
    enabled_ptr, slot_ptr, skip_ptr, HAS_ENABLED: tl.constexpr, HAS_SLOT: tl.constexpr, HAS_SKIP: tl.constexpr
):
    """Whether _nonzero_share_kernel counts, and the slot it writes (0 without HAS_SLOT)."""
    if HAS_SLOT:
        chosen = tl.load(slot_ptr) != 0
        if HAS_ENABLED:
            go = chosen | (tl.load(enabled_ptr) != 0)
        else:
            go = chosen
    else:
        chosen = tl.full((), 0, tl.int1)
        go = _enabled(enabled_ptr, HAS_ENABLED)
    if HAS_SKIP:
        counted = go & (tl.load(skip_ptr) == 0)
    else:
        counted = go
    return counted, chosen.to(tl.int32)


@triton.jit
def _count_blocks(grad_ptr, n_elements, first, step, USE_INT64: tl.constexpr, BLOCK: tl.constexpr):
    """The values that are finite and not zero in blocks first, first + step, ..."""
    count = tl.full((), 0, tl.int64)
    for block in range(first, tl.cdiv(n_elements, BLOCK), step):
        start, offsets = _block_span(block, USE_INT64, BLOCK)
        # float64 holds every gradient value exactly, and its inf - inf and NaN - NaN are NaN on every path (16-bit
        # arithmetic under the interpreter is not IEEE's).
        values = tl.load(grad_ptr + offsets, mask=offsets < n_elements, other=0.0).to(tl.float64)
        live = (values != 0) & ((values - values) == 0)
        count += tl.sum(live.to(tl.int64), axis=0)
    return count


@triton.jit
def _write_share(out_ptr, index, count, total, ADD: tl.constexpr):
    """out[index] ← (out[index] if ADD) + count / total, in float64."""
    # tl.full keeps the float64 argument's value under the interpreter too, which rounds bare floats to float32.
    share = count.to(tl.float64) / tl.full((), total, tl.float64)
    if ADD:
        share = tl.load(out_ptr + index) + share
    tl.store(out_ptr + index, share)


@triton.jit(do_not_specialize=["n_elements"])
def _nonzero_share_kernel(
    grad_ptr,
    out_ptr,
    enabled_ptr,
    slot_ptr,
    skip_ptr,
    n_elements,
    total: tl.float64,
    ADD: tl.constexpr,
    HAS_ENABLED: tl.constexpr,
    HAS_SLOT: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    USE_INT64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: out[s] ← (out[s] if ADD) + the count of values that are finite and not zero divided by ``total``, in
    float64; s = 0, or with HAS_SLOT the flag at slot_ptr (the count then runs where either flag is set). A zero flag,
    or a non-zero skip (GradScaler's found_inf), reads nothing and writes nothing. For buffers up to
    SHARE_PROGRAM_LIMIT elements: one launch, whose sum needs no second one."""
    go, index = _count_flags(enabled_ptr, slot_ptr, skip_ptr, HAS_ENABLED, HAS_SLOT, HAS_SKIP)
    if go:
        _write_share(out_ptr, index, _count_blocks(grad_ptr, n_elements, 0, 1, USE_INT64, BLOCK), total, ADD)


@triton.jit(do_not_specialize=["n_elements"])
def _nonzero_partials_kernel(
    grad_ptr,
    partials_ptr,
    enabled_ptr,
    slot_ptr,
    skip_ptr,
    n_elements,
    HAS_ENABLED: tl.constexpr,
    HAS_SLOT: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    USE_INT64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """A larger buffer's count, per program (every EPOCH_PROGRAMS-th block) into partials[pid], gated as
    _nonzero_share_kernel; _nonzero_share_finish_kernel adds them."""
    go, index = _count_flags(enabled_ptr, slot_ptr, skip_ptr, HAS_ENABLED, HAS_SLOT, HAS_SKIP)
    if go:
        pid = tl.program_id(0)
        tl.store(partials_ptr + pid, _count_blocks(grad_ptr, n_elements, pid, tl.num_programs(0), USE_INT64, BLOCK))


@triton.jit
def _nonzero_share_finish_kernel(
    partials_ptr,
    n_partials,
    out_ptr,
    enabled_ptr,
    slot_ptr,
    skip_ptr,
    total: tl.float64,
    ADD: tl.constexpr,
    HAS_ENABLED: tl.constexpr,
    HAS_SLOT: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: the partials' sum written as _nonzero_share_kernel writes its count (integers: exact in any
    order)."""
    go, index = _count_flags(enabled_ptr, slot_ptr, skip_ptr, HAS_ENABLED, HAS_SLOT, HAS_SKIP)
    if go:
        offsets = tl.arange(0, BLOCK)
        count = tl.sum(tl.load(partials_ptr + offsets, mask=offsets < n_partials, other=0), axis=0)
        _write_share(out_ptr, index, count, total, ADD)


@triton.jit
def _epoch_commit_block(param_ptr, prev_params_ptr, momentum_ptr, restore, offsets, mask, HAS_MOMENTUM: tl.constexpr):
    if restore:
        tl.store(param_ptr + offsets, _load(prev_params_ptr + offsets, mask), mask=mask)
        if HAS_MOMENTUM:
            tl.store(momentum_ptr + offsets, tl.zeros_like(offsets).to(momentum_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(prev_params_ptr + offsets, _load(param_ptr + offsets, mask), mask=mask)


@triton.jit(do_not_specialize=["n_elements"])
def _epoch_commit_kernel(
    param_ptr,
    prev_params_ptr,
    rolled_back_ptr,
    enabled_ptr,
    momentum_ptr,
    n_elements,
    HAS_ENABLED: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    USE_INT64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The second pass, a copy: θ_prev ← θ, or θ ← θ_prev when the rollback flag (read on the device) is set,
    and then (HAS_MOMENTUM) m ← 0. HAS_ENABLED: as in _epoch_end_kernel."""
    if _enabled(enabled_ptr, HAS_ENABLED):
        restore = tl.load(rolled_back_ptr) != 0
        for block in range(tl.program_id(0), tl.cdiv(n_elements, BLOCK), tl.num_programs(0)):
            start, offsets = _block_span(block, USE_INT64, BLOCK)
            if n_elements - start >= BLOCK:
                _epoch_commit_block(param_ptr, prev_params_ptr, momentum_ptr, restore, offsets, None, HAS_MOMENTUM)
            else:
                mask = offsets < n_elements
                _epoch_commit_block(param_ptr, prev_params_ptr, momentum_ptr, restore, offsets, mask, HAS_MOMENTUM)


# Whether triton.jit built the kernels for the interpreter: TRITON_INTERPRET=1 counts only if it was set
# before triton was imported, so the kernels themselves are asked.
_INTERPRETED = isinstance(_step_kernel, InterpretedFunction)


def _needs_int64(n_elements: int) -> bool:
    """Whether the offsets of the blocks covering n elements, up to cdiv(n, BLOCK) * BLOCK - 1, pass int32."""
    return triton.cdiv(n_elements, BLOCK_SIZE) * BLOCK_SIZE > INT32_INDEX_LIMIT


def _on_device(device: torch.device):
    """Make ``device`` current for the launch: Triton launches on the current CUDA device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_flat(operation: str, tensors: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype]) -> None:
    """Raise unless every tensor is 1-D, contiguous, of the first one's length and device, and dtype as given."""
    first = next(iter(tensors.values()))
    for name, tensor in tensors.items():
        if (
            tensor.dim() != 1
            or not tensor.is_contiguous()
            or tensor.numel() != first.numel()
            or tensor.device != first.device
        ):
            raise ValueError(
                f"triton backend {operation}: {name} must be a 1-D contiguous tensor of {first.numel()} elements "
                f"on {first.device}, got shape {tuple(tensor.shape)}, strides {tensor.stride()} on {tensor.device}; "
                f"pass equal slices of the flat buffers (bbfused.buffers.FlatBuffer)"
            )
        if tensor.dtype != dtypes[name]:
            raise ValueError(
                f"triton backend {operation}: {name} has dtype {tensor.dtype}, expected {dtypes[name]} for "
                f"{first.dtype} parameters (the EMA is {state_dtype(first.dtype)}); pass the flat buffers as built"
            )


def partial_columns(n_elements: int) -> int:
    """The programs of an epoch-end pass over ``n_elements`` (each loops over every EPOCH_PROGRAMS-th block), and so
    the partials it writes per row."""
    return min(triton.cdiv(n_elements, BLOCK_SIZE), EPOCH_PROGRAMS)


def _epoch_sums(
    kernel,
    rows: int,
    operation: str,
    param,
    ema,
    prev_params,
    prev_ema,
    enabled,
    out: torch.Tensor | None = None,
    second_moment: torch.Tensor | None = None,
    bias_correction: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """Launch an epoch-end ``kernel`` that writes ``rows`` per-block float64 partials; their sums, (rows,), or
    with ``out`` (a (rows, blocks) float64 view, rows at any stride) the partials written into it, unsummed.
    With ``second_moment``, the measuring pass in the preconditioner's metric (_preconditioned_measure_kernel)
    in place of ``kernel``.

    Summing a fixed-length float64 tensor gives the same bits every run; an empty buffer sums to zeros. With
    ``enabled`` false the kernel writes zeros into the partials and nothing else."""
    check_second_moment_arguments(second_moment, bias_correction)
    state = state_dtype(param.dtype)
    flat = {"param": param, "ema": ema, "prev_params": prev_params, "prev_ema": prev_ema}
    dtypes = {"param": param.dtype, "ema": state, "prev_params": param.dtype, "prev_ema": state}
    preconditioner = ()
    if second_moment is not None:
        flat["second_moment"], dtypes["second_moment"] = second_moment, state
        _check_scalar(operation, "bias_correction", bias_correction, param.device, torch.float64)
        kernel, preconditioner = _preconditioned_measure_kernel, (second_moment, bias_correction, float(eps))
    _check_flat(operation, flat, dtypes)
    if enabled is not None:
        _check_scalar(operation, "enabled", enabled, param.device)
    n_elements = param.numel()
    programs = partial_columns(n_elements)
    partials = torch.empty((rows, programs), dtype=torch.float64, device=param.device) if out is None else out
    if tuple(partials.shape) != (rows, programs) or partials.stride(1) != 1 or partials.dtype != torch.float64:
        raise ValueError(
            f"triton backend {operation}: out must be a float64 ({rows}, {programs}) view with contiguous rows, got "
            f"{partials.dtype} {tuple(partials.shape)} with strides {partials.stride()}"
        )
    if programs:
        with _on_device(param.device):
            kernel[(programs,)](
                param,
                ema,
                prev_params,
                prev_ema,
                partials,
                enabled,
                n_elements,
                partials.stride(0),
                *preconditioner,
                HAS_ENABLED=enabled is not None,
                USE_INT64=_needs_int64(n_elements),
                BLOCK=BLOCK_SIZE,
                num_warps=NUM_WARPS,
            )
    return partials.sum(dim=1) if out is None else partials


def _check_weight_decay_table(table: torch.Tensor, n_elements: int, device: torch.device) -> None:
    blocks = triton.cdiv(n_elements, BLOCK_SIZE)
    if table.dtype != torch.float64 or table.shape != (blocks,) or table.device != device:
        raise ValueError(
            f"triton backend step: a weight-decay table must be float64 of shape ({blocks},), one value per block of "
            f"{BLOCK_SIZE} elements, on {device}; got {table.dtype} {tuple(table.shape)} on {table.device}. Pass a "
            f"number, or bbfused.buffer_runs.BufferRun.weight_decay_table"
        )


def _check_scalar(
    operation: str, name: str, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None
) -> None:
    if tensor.numel() != 1 or tensor.device != device:
        raise ValueError(
            f"triton backend {operation}: {name} must be a one-element tensor on {device}, got shape "
            f"{tuple(tensor.shape)} on {tensor.device}; move it to the parameters' device"
        )
    if dtype is not None and tensor.dtype != dtype:
        raise ValueError(f"triton backend {operation}: {name} must be {dtype}, got {tensor.dtype}")


class TritonBackend:
    """The fused step and epoch end as Triton kernels over 1-D contiguous flat buffers (see base.Backend)."""

    name = "triton"
    # The step takes the weight decay as a table of one value per block of this many elements (see step).
    weight_decay_block = BLOCK_SIZE

    def __init__(self) -> None:
        # An ema_mode given as an int, as the constant int32 tensor the step kernel reads it from, per device.
        self._mode_constants: dict[tuple[torch.device, int], torch.Tensor] = {}

    def step(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        ema: torch.Tensor,
        *,
        lr: torch.Tensor,
        weight_decay: float | torch.Tensor,
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
        """One launch over n elements; reads lr, grad_scale, found_inf, bias_correction and a tensor ema_mode on the
        device (no host sync).

        ``weight_decay``: a number, or a float64 table with each block's (``weight_decay_block`` elements, from the
        first), for buffers of several groups laid end to end (``bbfused.buffer_runs``). ``second_moment``: Adam's
        scaling of the step (base.Backend.step), in _preconditioned_step_kernel."""
        check_momentum_arguments(momentum_buffer, momentum, nesterov)
        check_second_moment_arguments(second_moment, bias_correction, beta2)
        check_ema_mode(ema_mode, momentum_buffer is not None, second_moment is not None, window_steps)
        state = state_dtype(param.dtype)
        flat = {"param": param, "grad": grad, "ema": ema}
        dtypes = {"param": param.dtype, "grad": param.dtype, "ema": state}
        if momentum_buffer is not None:
            flat["momentum_buffer"], dtypes["momentum_buffer"] = momentum_buffer, state
        if second_moment is not None:
            flat["second_moment"], dtypes["second_moment"] = second_moment, state
            _check_scalar("step", "bias_correction", bias_correction, param.device, torch.float64)
        _check_flat("step", flat, dtypes)
        for name, scalar in (
            ("lr", lr),
            ("grad_scale", grad_scale),
            ("found_inf", found_inf),
            ("nonfinite", nonfinite),
            ("ema_mode", ema_mode if isinstance(ema_mode, torch.Tensor) else None),
        ):
            if scalar is not None:
                _check_scalar("step", name, scalar, param.device)
        n_elements = param.numel()
        table = weight_decay if isinstance(weight_decay, torch.Tensor) else None
        if table is not None:
            _check_weight_decay_table(table, n_elements, param.device)
        if n_elements == 0:
            return
        # A mode other than EMA_UPDATE (checked above to come with a momentum buffer and no second moment) is read at
        # a pointer, an int from the host through a constant tensor.
        mode = self._mode_tensor(ema_mode, param.device)
        kernel, kernel_arguments = _step_kernel, (mode, point_coefficient(momentum, nesterov), int(window_steps))
        if second_moment is not None:
            kernel_arguments = (second_moment, bias_correction, float(beta2), float(eps))
            kernel = _preconditioned_step_kernel
        with _on_device(param.device):
            kernel[(triton.cdiv(n_elements, BLOCK_SIZE),)](
                param,
                grad,
                ema,
                lr,
                grad_scale,
                found_inf,
                nonfinite,
                momentum_buffer,
                table,
                n_elements,
                0.0 if table is not None else float(weight_decay),
                float(beta),
                float(momentum),
                *kernel_arguments,
                HAS_SCALE=grad_scale is not None,
                HAS_WEIGHT_DECAY_TABLE=table is not None,
                HAS_FOUND_INF=found_inf is not None,
                SKIP_NONFINITE=nonfinite is not None,
                HAS_MOMENTUM=momentum_buffer is not None,
                NESTEROV=bool(nesterov),
                **({"EMA_WINDOW": mode is not None} if second_moment is None else {}),
                USE_INT64=_needs_int64(n_elements),
                BLOCK=BLOCK_SIZE,
                ROW=STEP_ROW.get(param.dtype, 1),
                **STEP_OPTIONS,
            )

    def _mode_tensor(self, ema_mode: EmaMode, device: torch.device) -> torch.Tensor | None:
        """The step's ema_mode as the kernel reads it: a tensor as given; an int as a constant int32 tensor on the
        device, made once (no copy a step); None for EMA_UPDATE, which needs no read."""
        if isinstance(ema_mode, torch.Tensor):
            return ema_mode
        if ema_mode == EMA_UPDATE:
            return None
        key = (device, ema_mode)
        if key not in self._mode_constants:
            self._mode_constants[key] = torch.tensor(ema_mode, dtype=torch.int32, device=device)
        return self._mode_constants[key]

    def epoch_end(
        self,
        param: torch.Tensor,
        ema: torch.Tensor,
        prev_params: torch.Tensor,
        prev_ema: torch.Tensor,
        *,
        enabled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One launch writing per-block float64 partials, summed in a fixed order on the device.

        Returns float64 (2,) ``[‖θ − θ_prev‖², (θ − θ_prev)ᵀ(g − g_prev)]`` without synchronising.
        """
        return _epoch_sums(_epoch_end_kernel, 2, "epoch_end", param, ema, prev_params, prev_ema, enabled)

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
        """One launch writing per-block float64 partials, summed in a fixed order on the device (no sync). With
        ``second_moment``, the first sum in the preconditioner's metric (base.Backend.epoch_measure)."""
        return _epoch_sums(
            _epoch_measure_kernel, 4, "epoch_measure", param, ema, prev_params, prev_ema, enabled,
            second_moment=second_moment, bias_correction=bias_correction, eps=eps,
        )  # fmt: skip

    def epoch_measure_partials(
        self,
        buffers: list[tuple[torch.Tensor, ...]],
        *,
        enabled: torch.Tensor | None = None,
        bias_correction: torch.Tensor | None = None,
        eps: float = 0.0,
    ) -> torch.Tensor:
        """epoch_measure over several buffers (each ``(param, ema, prev_params, prev_ema)``, or with a fifth item,
        that buffer's second moment or None; on one device), one launch each, without the sums: their per-block
        partials side by side, float64 (4, blocks of all), for a decision kernel that adds each row itself
        (``bbfused.control.safeguard_kernel``): no sum launches. A buffer with a second moment gives its first row
        in the preconditioner's metric, with ``bias_correction`` and ``eps`` as in epoch_measure."""
        for buffer in buffers:
            # Before any launch: a missing bias correction must not leave the earlier buffers' passes done.
            check_second_moment_arguments(buffer[4] if len(buffer) > 4 else None, bias_correction)
        columns = [partial_columns(buffer[0].numel()) for buffer in buffers]
        partials = torch.empty((4, sum(columns)), dtype=torch.float64, device=buffers[0][0].device)
        start = 0
        for buffer, width in zip(buffers, columns):
            view = partials[:, start : start + width]
            second_moment = buffer[4] if len(buffer) > 4 else None
            _epoch_sums(
                _epoch_measure_kernel, 4, "epoch_measure", *buffer[:4], enabled, out=view,
                second_moment=second_moment, bias_correction=bias_correction, eps=eps,
            )  # fmt: skip
            start += width
        return partials

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
        """One launch (no sync), gated like the epoch-end passes."""
        _check_flat("nonzero_share", {"grad": grad}, {"grad": grad.dtype})
        if slot is None:
            _check_scalar("nonzero_share", "out", out, grad.device, torch.float64)
        else:
            _check_scalar("nonzero_share", "slot", slot, grad.device)
            if out.shape != (2,) or out.dtype != torch.float64 or out.device != grad.device or out.stride(0) != 1:
                raise ValueError(
                    f"triton backend nonzero_share: with a slot, out must be a contiguous float64 (2,) tensor on "
                    f"{grad.device}, got {out.dtype} {tuple(out.shape)} on {out.device}"
                )
        for name, flag in (("enabled", enabled), ("skip", skip)):
            if flag is not None:
                _check_scalar("nonzero_share", name, flag, grad.device)
        n_elements = grad.numel()
        flags = {"HAS_ENABLED": enabled is not None, "HAS_SLOT": slot is not None, "HAS_SKIP": skip is not None}
        with _on_device(grad.device):
            if n_elements <= SHARE_PROGRAM_LIMIT:
                _nonzero_share_kernel[(1,)](
                    grad, out, enabled, slot, skip, n_elements, float(total), ADD=bool(add), **flags,
                    USE_INT64=_needs_int64(n_elements), BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS,
                )  # fmt: skip
                return
            programs = partial_columns(n_elements)
            partials = torch.empty(programs, dtype=torch.int64, device=grad.device)
            _nonzero_partials_kernel[(programs,)](
                grad, partials, enabled, slot, skip, n_elements, **flags,
                USE_INT64=_needs_int64(n_elements), BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS,
            )  # fmt: skip
            _nonzero_share_finish_kernel[(1,)](
                partials, programs, out, enabled, slot, skip, float(total), ADD=bool(add), **flags,
                BLOCK=EPOCH_PROGRAMS, num_warps=NUM_WARPS,
            )  # fmt: skip

    def epoch_commit(
        self,
        param: torch.Tensor,
        prev_params: torch.Tensor,
        rolled_back: torch.Tensor,
        *,
        enabled: torch.Tensor | None = None,
        momentum_buffer: torch.Tensor | None = None,
    ) -> None:
        """One launch; the rollback flag is read on the device."""
        flat, dtypes = {"param": param, "prev_params": prev_params}, {"param": param.dtype, "prev_params": param.dtype}
        if momentum_buffer is not None:
            flat["momentum_buffer"], dtypes["momentum_buffer"] = momentum_buffer, state_dtype(param.dtype)
        _check_flat("epoch_commit", flat, dtypes)
        _check_scalar("epoch_commit", "rolled_back", rolled_back, param.device)
        if enabled is not None:
            _check_scalar("epoch_commit", "enabled", enabled, param.device)
        n_elements = param.numel()
        if n_elements == 0:
            return
        with _on_device(param.device):
            _epoch_commit_kernel[(partial_columns(n_elements),)](
                param,
                prev_params,
                rolled_back,
                enabled,
                momentum_buffer,
                n_elements,
                HAS_ENABLED=enabled is not None,
                HAS_MOMENTUM=momentum_buffer is not None,
                USE_INT64=_needs_int64(n_elements),
                BLOCK=BLOCK_SIZE,
                num_warps=NUM_WARPS,
            )


def unavailable_reason(device: torch.device) -> str | None:
    """None on CUDA devices, and on CPU when the kernels run through the Triton interpreter; else why not."""
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "PyTorch finds no CUDA device"
    if device.type == "cpu":
        if _INTERPRETED:
            return None
        return (
            f"Triton kernels need a CUDA GPU; CPU tensors run only through the Triton interpreter, which is off "
            f"(TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}; it must be '1' before triton is first "
            f"imported, as the tests set it). On CPU use backend='cpp' or backend='eager'"
        )
    return f"the triton backend runs on CUDA devices, not {device.type}; use backend='eager'"
