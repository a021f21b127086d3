"""Momentum in the buffers: FlatBuffer's momentum buffer (layout, state views, copies) and BufferSet's use of it (the
step's arguments, the rollback's reset). The kernels' arithmetic against the eager reference is test_backends.py's,
test_triton_backend.py's and test_cpp_backend.py's."""

from __future__ import annotations

import copy
import pickle
from types import SimpleNamespace

import pytest
import torch

from bbfused.backends import load_backend
from bbfused.buffer_set import BufferSet
from bbfused.buffers import FlatBuffer

CPU = torch.device("cpu")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["eager", "triton"] + (["cpp"] if DEVICE.type == "cpu" else [])
SHAPES = [(3, 5), (0,), (7,), (2, 2)]  # 15, 0, 7 and 4 elements: slices at 0, 16, 16 and 32, padding between


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64).to(DEVICE, dtype))
        for shape in SHAPES
    ]


def padding_mask(buffer: FlatBuffer) -> torch.Tensor:
    """True at the elements of the flat buffers that belong to no parameter."""
    mask = torch.ones(buffer.numel, dtype=torch.bool, device=buffer.device)
    for offset, p in zip(buffer.offsets, buffer.params):
        mask[offset : offset + p.numel()] = False
    return mask


# ------------------------------------------------------------------------------------------ FlatBuffer
@pytest.mark.parametrize(
    ("dtype", "state"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)],
    ids=str,
)
def test_flat_buffer_momentum_has_the_state_dtype_and_layout(dtype: torch.dtype, state: torch.dtype) -> None:
    params = make_params(dtype)
    buffer = FlatBuffer(params, [f"p{i}" for i in range(len(params))], 0, momentum=True)
    assert buffer.momentum.dtype == state and buffer.momentum.shape == (buffer.numel,) == (48,)
    assert buffer.momentum.device == DEVICE and not buffer.momentum.any()
    for index, p in enumerate(params):
        views = buffer.state_views(index)
        assert list(views) == ["ema", "prev_params", "prev_ema", "momentum_buffer"]
        view = views["momentum_buffer"]
        assert view.shape == p.shape and view.dtype == state
        view.fill_(index + 1)  # a view of the flat buffer, not a copy
        flat_slice = buffer.momentum[buffer.offsets[index] : buffer.offsets[index] + p.numel()]
        assert torch.equal(flat_slice, torch.full_like(flat_slice, index + 1))
    assert not buffer.momentum[padding_mask(buffer)].any()

    plain = FlatBuffer(make_params(dtype), [f"p{i}" for i in range(len(SHAPES))], 0)
    assert plain.momentum is None and "momentum_buffer" not in plain.state_views(0)


@pytest.mark.parametrize(
    "make_copy", [copy.deepcopy, lambda b: pickle.loads(pickle.dumps(b))], ids=["deepcopy", "pickle"]
)
def test_flat_buffer_with_momentum_round_trips_copies(make_copy) -> None:
    buffer = FlatBuffer(make_params(), [f"p{i}" for i in range(len(SHAPES))], 0, momentum=True)
    with torch.no_grad():
        buffer.momentum.copy_(torch.randn(buffer.numel, generator=torch.Generator().manual_seed(1)).to(DEVICE))
        buffer.momentum[padding_mask(buffer)] = 0
        buffer.ema.normal_()
    copied = make_copy(buffer)
    assert copied.momentum is not None and copied.momentum.data_ptr() != buffer.momentum.data_ptr()
    assert torch.equal(copied.momentum, buffer.momentum) and torch.equal(copied.ema, buffer.ema)
    assert torch.equal(copied.state_views(3)["momentum_buffer"], buffer.state_views(3)["momentum_buffer"])
    plain = make_copy(FlatBuffer(make_params(), [f"p{i}" for i in range(len(SHAPES))], 0))
    assert plain.momentum is None


# ------------------------------------------------------------------------------------------ BufferSet
def buffer_set(backend: str, momentum: float, nesterov: bool, params: list[torch.nn.Parameter], **kwargs) -> BufferSet:
    buffers = BufferSet(backend, 0.05, skip_nonfinite=True, momentum=momentum, nesterov=nesterov, **kwargs)
    buffers.add_devices([DEVICE])
    buffers.pack({"params": params}, [f"p{i}" for i in range(len(params))], 0, join_epoch=0)
    return buffers


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy_ball", "nesterov"])
def test_buffer_set_steps_with_its_momentum(backend: str, nesterov: bool) -> None:
    """Two steps through the BufferSet give, over the parameters with a gradient, what the eager backend's step
    gives on copies of the flat buffers with the same momentum; a parameter without a gradient keeps its momentum,
    and the padding stays zero."""
    params = [torch.nn.Parameter(p.detach().clone()) for p in make_params()]  # no .grad yet: none is written
    buffers = buffer_set(backend, 0.8, nesterov, params)
    (buffer,) = buffers.buffers
    with torch.no_grad():
        start = torch.randn(buffer.numel, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        buffer.momentum.copy_(start.to(DEVICE).masked_fill(padding_mask(buffer).to(DEVICE), 0))
    momentum_before = buffer.momentum.clone()
    flat = {name: getattr(buffer, name).clone() for name in ("param", "grad", "ema", "momentum")}
    for step in range(2):
        for i in (0, 3):  # parameters 1 (empty) and 2 get no gradient: the step covers [0, 15) and [32, 36)
            params[i].grad.copy_(torch.full_like(params[i], 0.5 + step))
        buffers.step([1e-2], beta=0.25, grad_scale=None, found_inf=None, whole_buffers=False)
        for start, end in [(0, 15), (32, 36)]:
            flat["grad"][start:end] = 0.5 + step
            load_backend("eager", DEVICE).step(
                flat["param"][start:end],
                flat["grad"][start:end],
                flat["ema"][start:end],
                lr=torch.tensor(0.05, dtype=torch.float64),
                weight_decay=1e-2,
                beta=0.25,
                nonfinite=torch.zeros((), dtype=torch.int64),
                momentum_buffer=flat["momentum"][start:end],
                momentum=0.8,
                nesterov=nesterov,
            )
    for name in ("param", "ema", "momentum"):
        assert torch.equal(getattr(buffer, name), flat[name]), name
    assert torch.equal(buffer.momentum[16:23], momentum_before[16:23])  # parameter 2: no gradient, untouched
    assert not torch.equal(buffer.momentum[:15], momentum_before[:15])
    assert not buffer.momentum[padding_mask(buffer)].any() and not buffer.param[padding_mask(buffer)].any()


def test_buffer_set_without_momentum_packs_no_momentum_buffers() -> None:
    buffers = buffer_set("eager", 0.0, False, make_params())
    assert buffers.buffers[0].momentum is None
    assert "momentum_buffer" not in dict(buffers.state_views())[buffers.buffers[0].params[0]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("momentum", "nesterov"), [(-0.1, False), (0.0, True)], ids=["negative", "nesterov"])
def test_buffer_set_refuses_at_the_step_a_momentum_it_has_no_buffer_for(
    backend: str, momentum: float, nesterov: bool
) -> None:
    """BB's constructor checks momentum and nesterov (bbfused/arguments.py: tests/test_policy.py and
    test_optimizer.py). BufferSet takes them as given, packs no momentum buffer for a momentum <= 0, and a momentum
    or Nesterov it has no buffer for is refused by the step, before anything is written, not silently ignored."""
    params = make_params()
    buffers = buffer_set(backend, momentum, nesterov, params)
    (buffer,) = buffers.buffers
    assert buffer.momentum is None
    for p in params:
        p.grad.fill_(1.0)
    param_before, ema_before = buffer.param.clone(), buffer.ema.clone()
    with pytest.raises((ValueError, RuntimeError), match="needs a momentum_buffer"):  # cpp: the op's RuntimeError
        buffers.step([0.0], beta=0.25, grad_scale=None, found_inf=None, whole_buffers=True)
    assert torch.equal(buffer.param, param_before) and torch.equal(buffer.ema, ema_before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("gate", "rolled_back", "zeroed"),
    [(None, False, False), (None, True, True), (False, True, False), (True, True, True), (True, False, False)],
)
def test_commit_zeroes_momentum_only_where_rolled_back_and_gated(
    backend: str, gate: bool | None, rolled_back: bool, zeroed: bool
) -> None:
    """A rolled-back epoch's momentum restarts from zero with the restored weights; a kept epoch's carries on. Under
    a device clock only a step whose gate is set commits."""
    buffers = buffer_set(backend, 0.9, False, make_params())
    (buffer,) = buffers.buffers
    with torch.no_grad():
        buffer.momentum.fill_(0.5)
        buffer.prev_params.copy_(buffer.param * 2)
    param_before, prev_before = buffer.param.clone(), buffer.prev_params.clone()
    clock = SimpleNamespace(gate=None if gate is None else torch.tensor(gate, device=DEVICE))
    buffers.commit(torch.tensor(rolled_back, device=DEVICE), clock)
    assert torch.equal(buffer.momentum, torch.full_like(buffer.momentum, 0.0 if zeroed else 0.5))
    committed = gate is not False
    if committed and rolled_back:
        assert torch.equal(buffer.param, prev_before)  # θ restored
    elif committed:
        assert torch.equal(buffer.prev_params, param_before)  # θ_prev ← θ
    else:
        assert torch.equal(buffer.param, param_before) and torch.equal(buffer.prev_params, prev_before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronisation exists only with CUDA")
def test_commit_with_momentum_reads_nothing_on_the_host() -> None:
    buffers = buffer_set("triton", 0.9, True, make_params())
    clock = SimpleNamespace(gate=torch.tensor(True, device=DEVICE))
    rolled_back = torch.tensor(True, device=DEVICE)
    buffers.commit(rolled_back, clock)  # warm-up: the kernels compile
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        buffers.commit(rolled_back, clock)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not buffers.buffers[0].momentum.any()
