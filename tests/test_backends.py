"""Every fused backend against the eager reference: one step, the epoch end, and whole multi-epoch runs.

Parametrized over FUSED_BACKENDS so each backend runs the same checks. On a machine without CUDA the
tensors are on the CPU (Triton through its interpreter, see conftest.py); keep sizes small.
"""

from __future__ import annotations

import functools

import pytest
import torch

from bbfused import BB
from bbfused.backends import load_backend

FUSED_BACKENDS = ["triton", "cpp"]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS_ON_DEVICE = [b for b in FUSED_BACKENDS if not (b == "cpp" and DEVICE.type == "cuda")]

# One step, fp32: 1e-6 relative (the bound); 16-bit parameters: a couple of ulps.
STEP_TOLERANCE = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-6, atol=1e-7),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
}
SIZES = {
    "one": [(1,)],
    "thousand": [(1000,)],
    "odd": [(1000 + 37,)],  # not a multiple of any block size
    "several": [(3, 5), (0,), (7, 11, 2), (1,), (0, 4), (129,)],
}


def make_params(shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64).to(DEVICE, dtype))
        for shape in shapes
    ]


def set_gradients(params: list[torch.nn.Parameter], seed: int, scale: float = 1.0) -> None:
    """Make each p.grad a fixed random tensor, through backward as in training (loss = Σ p·target)."""
    generator = torch.Generator().manual_seed(seed)
    loss = 0
    for p in params:
        target = (torch.randn(p.shape, generator=generator, dtype=torch.float64) * scale).to(DEVICE, p.dtype)
        p.grad.zero_()
        loss = loss + (p * target).sum()
    loss.backward()


def twin_optimizers(backend: str, shapes, dtype, **kwargs) -> tuple[BB, BB, list, list]:
    eager_params = make_params(shapes, dtype)
    fused_params = make_params(shapes, dtype)
    eager = BB(eager_params, backend="eager", **kwargs)
    fused = BB(fused_params, backend=backend, **kwargs)
    return eager, fused, eager_params, fused_params


def assert_state_close(eager: BB, fused: BB, eager_params, fused_params, **tolerance) -> None:
    for pe, pf in zip(eager_params, fused_params):
        torch.testing.assert_close(pf.detach(), pe.detach(), **tolerance)
        assert fused.state[pf].keys() == eager.state[pe].keys()
        for key in ("ema", "prev_params", "prev_ema", "momentum_buffer"):
            if key in eager.state[pe]:  # momentum_buffer: with momentum only
                torch.testing.assert_close(fused.state[pf][key], eager.state[pe][key], **tolerance)


@pytest.mark.parametrize("backend", BACKENDS_ON_DEVICE)
@pytest.mark.parametrize("dtype", list(STEP_TOLERANCE), ids=str)
@pytest.mark.parametrize("sizes", list(SIZES))
def test_one_step_matches_eager(backend: str, dtype: torch.dtype, sizes: str) -> None:
    """The default momentum 0.9 makes the first step lr·0.1·d (EMA form, zero buffer): lr = 0.5 keeps it at 0.05·d,
    large enough to move a 16-bit parameter (a step under half an ulp would leave both copies untouched)."""
    eager, fused, eager_params, fused_params = twin_optimizers(
        backend, SIZES[sizes], dtype, lr=0.5, steps_per_epoch=10, weight_decay=1e-2
    )
    for opt, params in ((eager, eager_params), (fused, fused_params)):
        set_gradients(params, seed=1)
        opt.step()
    assert_state_close(eager, fused, eager_params, fused_params, **STEP_TOLERANCE[dtype])
    # The step moved every non-empty parameter: the comparison above is not between two untouched copies.
    for p, original in zip(fused_params, make_params(SIZES[sizes], dtype)):
        if p.numel():
            assert not torch.equal(p.detach(), original.detach())


@pytest.mark.parametrize("backend", BACKENDS_ON_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_epoch_end_sums_match_eager(backend: str, dtype: torch.dtype) -> None:
    n = 1000 + 37
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def inputs():
        g = torch.Generator().manual_seed(3)
        return [
            torch.randn(n, generator=g, dtype=torch.float64).to(DEVICE, t)
            for t in (dtype, state_dtype, dtype, state_dtype)
        ]

    eager_inputs, fused_inputs = inputs(), inputs()
    eager_sums = load_backend("eager", DEVICE).epoch_end(*eager_inputs)
    fused_sums = load_backend(backend, DEVICE).epoch_end(*fused_inputs)
    assert fused_sums.dtype == torch.float64 and fused_sums.shape == (2,)
    torch.testing.assert_close(fused_sums, eager_sums, rtol=1e-6, atol=1e-9)
    param, ema, prev_params, prev_ema = fused_inputs
    original = inputs()
    assert torch.equal(prev_params, original[0]) and torch.equal(param, original[0])
    assert torch.equal(prev_ema, original[1])
    assert torch.count_nonzero(ema) == 0


def grouped(params, weight_decays):
    half = len(params) // 2
    return [
        {"params": params[:half], "weight_decay": weight_decays[0]},
        {"params": params[half:], "weight_decay": weight_decays[1]},
    ]


@pytest.mark.parametrize("backend", BACKENDS_ON_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("safeguard", [True, False], ids=["default", "paper"])
def test_trajectory_matches_eager(backend: str, dtype: torch.dtype, safeguard: bool) -> None:
    """Whole epochs through both epoch ends: the default's two passes and the paper's single one."""
    shapes = SIZES["several"] + [(1000 + 37,)]
    results = []
    for name in ("eager", backend):
        params = make_params(shapes, dtype)
        opt = BB(grouped(params, (1e-3, 0.0)), lr=0.2, steps_per_epoch=4, backend=name, safeguard=safeguard)
        run_training_with_backward(opt, params, epochs=5, steps=4)
        results.append((opt.lr_history, [p.detach().clone() for p in params]))
    (eager_history, eager_final), (fused_history, fused_final) = results
    assert len(eager_history) == 5
    # The rule ran: epochs 2.. use rates the BB formula chose, not only lr.
    assert eager_history[2] != eager_history[0]
    torch.testing.assert_close(torch.tensor(fused_history), torch.tensor(eager_history), rtol=1e-5, atol=0)
    for pf, pe in zip(fused_final, eager_final):
        torch.testing.assert_close(pf, pe, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS_ON_DEVICE)
@pytest.mark.parametrize("safeguard", [True, False], ids=["default", "paper"])
def test_group_added_mid_epoch_matches_eager(backend: str, safeguard: bool) -> None:
    """A group added in the middle of epoch 1 gets buffers of its own, which the fused step and epoch passes run
    over as over the constructor's; it joins the estimate at the end of epoch 3."""
    shapes = SIZES["several"] + [(1000 + 37,)]
    results = []
    for name in ("eager", backend):
        params = make_params(shapes, torch.float32)
        opt = BB(params[:3], lr=0.2, steps_per_epoch=4, backend=name, safeguard=safeguard)
        curvature = [torch.linspace(0.5, 2.0, p.numel(), dtype=torch.float64).reshape(p.shape) for p in params]
        generator = torch.Generator().manual_seed(0)
        for step in range(6 * 4):
            if step == 6:
                opt.add_param_group({"params": params[3:], "weight_decay": 1e-3})
            active = len(params) if step >= 6 else 3
            opt.zero_grad()
            loss = 0
            for p, c in zip(params[:active], curvature):
                noise = 0.1 * torch.randn(p.shape, generator=generator, dtype=torch.float64)
                theta = p.double()
                loss = loss + (0.5 * c.to(DEVICE) * theta * theta + noise.to(DEVICE) * theta).sum()
            loss.backward()
            opt.step()
        assert len(opt._buffers) == 2 and opt.state_dict()["bb"]["join_epochs"] == [0, 3]
        results.append((opt, params))
    (eager, eager_params), (fused, fused_params) = results
    assert len(set(eager.lr_history[2:])) > 1  # the rule ran
    torch.testing.assert_close(torch.tensor(fused.lr_history), torch.tensor(eager.lr_history), rtol=1e-5, atol=0)
    assert_state_close(eager, fused, eager_params, fused_params, rtol=1e-4, atol=1e-5)
    assert not torch.equal(fused_params[-1].detach(), make_params(shapes, torch.float32)[-1].detach())


def run_training_with_backward(opt: BB, params, epochs: int, steps: int, seed: int = 0) -> None:
    """A noisy quadratic through autograd: loss = ½ Σ c·θ² + noise·θ, so grad = c·θ + noise."""
    curvature = [torch.linspace(0.5, 2.0, p.numel(), dtype=torch.float64).reshape(p.shape) for p in params]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs * steps):
        opt.zero_grad()
        loss = 0
        for p, c in zip(params, curvature):
            noise = 0.1 * torch.randn(p.shape, generator=generator, dtype=torch.float64)
            theta = p.double()
            loss = loss + (0.5 * c.to(DEVICE) * theta * theta + noise.to(DEVICE) * theta).sum()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS_ON_DEVICE)
def test_bf16_trajectory_close_to_eager(backend: str) -> None:
    shapes = [(64, 3), (0,), (77,)]
    histories = []
    for name in ("eager", backend):
        params = make_params(shapes, torch.bfloat16)
        opt = BB(params, lr=0.1, steps_per_epoch=3, weight_decay=1e-3, backend=name)
        run_training_with_backward(opt, params, epochs=4, steps=3)
        histories.append(opt.lr_history)
    torch.testing.assert_close(torch.tensor(histories[1]), torch.tensor(histories[0]), rtol=2e-2, atol=0)


@pytest.mark.parametrize("backend", BACKENDS_ON_DEVICE)
def test_grad_scaler_contract(backend: str) -> None:
    """grad_scale divides the gradient; found_inf != 0 leaves θ, the EMA and the momentum untouched but counts the
    step. T = 16: the first rate period is 4 steps, so no period end (which restarts the EMA) follows these two."""
    shapes = SIZES["several"]
    eager, fused, eager_params, fused_params = twin_optimizers(
        backend, shapes, torch.float32, lr=0.05, steps_per_epoch=16, weight_decay=1e-2
    )
    set_gradients(eager_params, seed=2)
    eager.step()
    set_gradients(fused_params, seed=2, scale=1024.0)
    fused.grad_scale = torch.tensor(1024.0, device=DEVICE)
    fused.found_inf = torch.tensor(0.0, device=DEVICE)
    fused.step()
    assert_state_close(eager, fused, eager_params, fused_params, **STEP_TOLERANCE[torch.float32])

    before = [p.detach().clone() for p in fused_params]
    ema_before = [fused.state[p]["ema"].clone() for p in fused_params]
    momentum_before = [fused.state[p]["momentum_buffer"].clone() for p in fused_params]
    assert any(m.any() for m in momentum_before)  # the first step wrote the momentum: its skip below is visible
    for p in fused_params:
        if p.numel():
            p.grad.fill_(float("inf"))
    fused.found_inf = torch.tensor(1.0, device=DEVICE)
    fused.step()
    del fused.grad_scale, fused.found_inf
    for p, theta, ema, momentum in zip(fused_params, before, ema_before, momentum_before):
        assert torch.equal(p.detach(), theta)
        assert torch.equal(fused.state[p]["ema"], ema)
        assert torch.equal(fused.state[p]["momentum_buffer"], momentum)
    assert fused.step_in_epoch == 2


@pytest.mark.parametrize("backend", BACKENDS_ON_DEVICE)
def test_found_inf_without_grad_scale(backend: str) -> None:
    """After scaler.unscale_(), grad_scale is None but found_inf must still skip (pytorch#95847)."""
    params = make_params([(33,)], torch.float32)
    opt = BB(params, lr=0.1, steps_per_epoch=5, backend=backend)
    before = params[0].detach().clone()
    params[0].grad.fill_(1.0)
    opt.grad_scale = None
    opt.found_inf = torch.tensor(1.0, device=DEVICE)
    opt.step()
    assert torch.equal(params[0].detach(), before)


@pytest.mark.parametrize("backend", BACKENDS_ON_DEVICE)
def test_deterministic(backend: str) -> None:
    runs = []
    for _ in range(2):
        params = make_params([(1000 + 37,), (5, 5)], torch.float32)
        opt = BB(params, lr=0.3, steps_per_epoch=3, backend=backend)
        run_training_with_backward(opt, params, epochs=3, steps=3)
        runs.append((opt.lr_history, [p.detach().clone() for p in params]))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS_ON_DEVICE)
def test_parameters_without_gradients_are_untouched(backend: str) -> None:
    """Frozen and unused parameters between updated ones: the step covers only the gradient ranges."""
    eager, fused, eager_params, fused_params = twin_optimizers(
        backend, [(17,), (9,), (33,), (4,)], torch.float32, lr=0.05, steps_per_epoch=10, weight_decay=0.1
    )
    for opt, params in ((eager, eager_params), (fused, fused_params)):
        opt.zero_grad()  # set_to_none=True semantics: nothing has a gradient until it gets one
        params[1].requires_grad_(False)
        (params[0].sum() + 2 * params[2].sum()).backward()  # params[3] is unused
        opt.step()
    assert_state_close(eager, fused, eager_params, fused_params, **STEP_TOLERANCE[torch.float32])
    untouched = make_params([(17,), (9,), (33,), (4,)], torch.float32)
    for i in (1, 3):
        assert torch.equal(fused_params[i].detach(), untouched[i].detach())
        assert torch.count_nonzero(fused.state[fused_params[i]]["ema"]) == 0
    for i in (0, 2):
        assert not torch.equal(fused_params[i].detach(), untouched[i].detach())


def sgd_with_ema_momentum(params, momentum: float, **kwargs) -> torch.optim.SGD:
    """torch's SGD with BB's momentum: dampening = momentum makes buf ← μ·buf + (1 − μ)·d, BB's EMA form, and a
    zero buffer in place of torch's first-step buf = d makes the first step (1 − μ)·d, as BB's."""
    opt = torch.optim.SGD(params, momentum=momentum, dampening=momentum, **kwargs)
    for p in params:
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return opt


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("backend", ["eager", *BACKENDS_ON_DEVICE])
@pytest.mark.parametrize("safeguard", [True, False], ids=["default", "paper"])
def test_first_epochs_equal_torch_sgd(backend: str, set_to_none: bool, safeguard: bool) -> None:
    """Until the rate first moves BB is SGD with L2 weight decay: compare with torch.optim.SGD as torch's test_optim
    compares derived optimizers — a zero-size parameter, a step with no backward, and a layer frozen at step 3 and
    unfrozen at step 5. The paper's mode: plain SGD through epochs 0 and 1 (T = 4). The default: SGD with its
    momentum 0.9 in EMA form; its first epoch's periods may move the rate from the second period end on, so
    T = 16 (periods of 4 steps; the first end has no estimate and keeps the rate) covers the 7 steps."""
    if safeguard:
        reference, steps = functools.partial(sgd_with_ema_momentum, momentum=0.9, lr=0.05, weight_decay=1e-2), 16
    else:
        reference, steps = functools.partial(torch.optim.SGD, lr=0.05, weight_decay=1e-2), 4
    results = []
    for make_optimizer in (
        reference,
        lambda params: BB(
            params, lr=0.05, steps_per_epoch=steps, weight_decay=1e-2, backend=backend, safeguard=safeguard
        ),
    ):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(DEVICE)
        empty = torch.nn.Parameter(torch.zeros(0, 4, device=DEVICE))
        opt = make_optimizer([*model.parameters(), empty])
        x = torch.randn(7, 5, device=DEVICE)
        model[2].bias.requires_grad_(False)  # frozen throughout: never has a gradient
        for step in range(7):
            opt.zero_grad(set_to_none=set_to_none)
            model[0].requires_grad_(not 3 <= step < 5)
            if step != 2:  # step 2: no backward at all
                (model(x).square().mean() + empty.sum()).backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
        if isinstance(opt, BB):
            assert opt.lr == 0.05 and opt.rolled_back_epochs == []  # the rate never moved: SGD throughout
    for sgd, bb in zip(*results):
        torch.testing.assert_close(bb, sgd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS_ON_DEVICE)
def test_checkpoint_moves_between_backends(backend: str) -> None:
    """A state dict saved by one backend resumes on another and continues as the saving backend would (its rate
    from the state dict, not the constructor's lr)."""
    shapes = [(6, 5), (0,), (129,)]
    for saver, loader in (("eager", backend), (backend, "eager")):
        params = make_params(shapes, torch.float32)
        opt = BB(params, lr=0.1, steps_per_epoch=3, weight_decay=1e-3, backend=saver)
        run_training_with_backward(opt, params, epochs=2, steps=3)
        resumed_params = make_params(shapes, torch.float32, seed=5)
        with torch.no_grad():
            for p, q in zip(resumed_params, params):
                p.copy_(q)
        resumed = BB(resumed_params, lr=0.7, steps_per_epoch=3, backend=loader)
        resumed.load_state_dict(opt.state_dict())
        assert resumed.lr_history == opt.lr_history and resumed.epoch == 2
        run_training_with_backward(resumed, resumed_params, epochs=2, steps=3, seed=1)
        run_training_with_backward(opt, params, epochs=2, steps=3, seed=1)
        torch.testing.assert_close(torch.tensor(resumed.lr_history), torch.tensor(opt.lr_history), rtol=1e-5, atol=0)
        for p, q in zip(resumed_params, params):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ momentum
# Element counts: zero, one, odd, and several threads' worth of cpp work with a ragged tail (not for the slow Triton
# interpreter; its block edges are test_triton_backend.py's).
MOMENTUM_CASES = [
    (backend, n)
    for backend in BACKENDS_ON_DEVICE
    for n in (0, 1, 1000 + 37, 2 * 2**15 + 37)
    if not (backend == "triton" and DEVICE.type == "cpu" and n > 2**15)
]
BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def momentum_inputs(n: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """param, grad, ema, momentum buffer: all random (m ≠ 0 tests (1 − μ)·(d − m) with both terms)."""
    generator = torch.Generator().manual_seed(seed)
    state = torch.float64 if dtype == torch.float64 else torch.float32
    return [
        torch.randn(n, generator=generator, dtype=torch.float64).to(DEVICE, t) for t in (dtype, dtype, state, state)
    ]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(BITS[a.element_size()]), b.view(BITS[b.element_size()]))


def momentum_steps(backend, inputs, *, nesterov: bool, amp: str, steps: int = 3) -> None:
    """``steps`` steps with momentum 0.9 on the same gradient (m carries from one to the next)."""
    param, grad, ema, momentum_buffer = inputs
    grad_scale = torch.tensor(1024.0, device=DEVICE) if amp != "plain" else None
    found_inf = torch.tensor(0.0, device=DEVICE) if amp != "plain" else None
    if grad_scale is not None:
        grad = grad * 1024  # as GradScaler scales (a power of two: exact in every dtype)
    for step in range(steps):
        backend.step(
            param,
            grad,
            ema,
            lr=torch.tensor(0.05, dtype=torch.float64, device=DEVICE),
            weight_decay=1e-2,
            beta=0.25,
            grad_scale=grad_scale,
            found_inf=found_inf if amp != "found_inf" or step < steps - 1 else torch.ones((), device=DEVICE),
            momentum_buffer=momentum_buffer,
            momentum=0.9,
            nesterov=nesterov,
        )


@pytest.mark.parametrize(("backend", "n"), MOMENTUM_CASES)
@pytest.mark.parametrize("dtype", list(STEP_TOLERANCE), ids=str)
@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy_ball", "nesterov"])
@pytest.mark.parametrize("amp", ["plain", "scaled", "found_inf"])
def test_momentum_step_matches_eager(backend: str, dtype: torch.dtype, n: int, nesterov: bool, amp: str) -> None:
    """Three steps with momentum, against the eager reference: fp32 and fp64 bit for bit (θ, g and m), and 16-bit
    parameters too on cpp; Triton's 16-bit stores (truncated by the interpreter) within the one-step tolerance per
    step. "found_inf": the last step has found_inf set and writes nothing."""
    eager_inputs, fused_inputs, original = (momentum_inputs(n, dtype) for _ in range(3))
    steps = 3
    momentum_steps(load_backend("eager", DEVICE), eager_inputs, nesterov=nesterov, amp=amp, steps=steps)
    momentum_steps(load_backend(backend, DEVICE), fused_inputs, nesterov=nesterov, amp=amp, steps=steps)
    exact = dtype in (torch.float32, torch.float64) or backend == "cpp"
    tolerance = {key: steps * value for key, value in STEP_TOLERANCE[dtype].items()}
    for name, got, want, before in zip(("param", "grad", "ema", "momentum"), fused_inputs, eager_inputs, original):
        if exact or name == "grad":
            assert same_bits(got, want), name
        else:
            torch.testing.assert_close(got, want, **tolerance, msg=lambda m, name=name: f"{name}: {m}")
        if n and name != "grad":
            assert not torch.equal(got, before), name  # the steps moved it: not two untouched copies compared


@pytest.mark.parametrize("backend", ["eager", *BACKENDS_ON_DEVICE])
@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy_ball", "nesterov"])
def test_momentum_step_values(backend: str, nesterov: bool) -> None:
    """The formulas on numbers exact in binary: μ = 0.75, θ = 1, grad = 2.5, m = 0.5, g = 0, lr = 0.5, β = 0.5.
    m ← 0.5 + 0.25·(2.5 − 0.5) = 1; heavy ball θ ← 1 − 0.5·1 = 0.5; Nesterov θ ← 1 − 0.5·(0.25·2.5 + 0.75·1)
    = 0.3125; g ← 0 + 0.5·(2.5 − 0) = 1.25. Without a buffer, momentum must be 0."""
    param, grad, ema, m = (torch.tensor([v], device=DEVICE) for v in (1.0, 2.5, 0.0, 0.5))
    step = load_backend(backend, DEVICE).step
    lr = torch.tensor(0.5, dtype=torch.float64, device=DEVICE)
    step(param, grad, ema, lr=lr, weight_decay=0.0, beta=0.5, momentum_buffer=m, momentum=0.75, nesterov=nesterov)
    assert param.item() == (0.3125 if nesterov else 0.5)
    assert m.item() == 1.0 and ema.item() == 1.25
    with pytest.raises((ValueError, RuntimeError), match="momentum_buffer"):
        step(param, grad, ema, lr=lr, weight_decay=0.0, beta=0.5, momentum=0.9)
    assert param.item() == (0.3125 if nesterov else 0.5)
