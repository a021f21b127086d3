"""The preconditioned step (``BB(preconditioner="adam")``) and its measuring pass in every backend, against the
eager reference: fp32 and fp64 bit for bit (16-bit too on cpp), across momentum, GradScaler, skipped non-finite
values and odd and zero sizes."""

from __future__ import annotations

import numpy
import pytest
import torch
from test_backends import BACKENDS_ON_DEVICE, DEVICE, SIZES, STEP_TOLERANCE, assert_state_close, make_params, same_bits

from bbfused import BB
from bbfused.backends import load_backend
from bbfused.preconditioner import BETA2, EPS

SIZES_SEVERAL = SIZES["several"]

# Element counts: zero, one, odd, and several threads' worth of cpp work with a ragged tail (not for the slow Triton
# interpreter).
CASES = [
    (backend, n)
    for backend in BACKENDS_ON_DEVICE
    for n in (0, 1, 1000 + 37, 2 * 2**15 + 37)
    if not (backend == "triton" and DEVICE.type == "cpu" and n > 2**15)
]


def inputs(n: int, dtype: torch.dtype, seed: int = 0, bad: bool = False) -> dict[str, torch.Tensor]:
    """param, grad, ema, momentum, second moment (positive): random; ``bad``: some gradients inf or NaN."""
    generator = torch.Generator().manual_seed(seed)
    state = torch.float64 if dtype == torch.float64 else torch.float32

    def random(t: torch.dtype) -> torch.Tensor:
        return torch.randn(n, generator=generator, dtype=torch.float64).to(DEVICE, t)

    values = {"param": random(dtype), "grad": random(dtype), "ema": random(state), "momentum": random(state)}
    values["second_moment"] = random(state).square() * 1e-2
    if bad and n > 3:
        values["grad"][1] = float("inf")
        values["grad"][n // 2] = float("nan")
    return values


def steps(backend_name: str, values: dict[str, torch.Tensor], *, momentum: str, amp: str, n_steps: int = 3) -> int:
    """``n_steps`` preconditioned steps (the bias correction of steps 1, 2, ...); returns the skipped count."""
    backend = load_backend(backend_name, DEVICE)
    grad = values["grad"]
    grad_scale = torch.tensor(1024.0, device=DEVICE) if amp != "plain" else None
    if grad_scale is not None:
        grad = grad * 1024
    nonfinite = torch.zeros((), dtype=torch.int64, device=DEVICE)
    for step in range(n_steps):
        found = None if amp == "plain" else torch.tensor(float(amp == "found_inf" and step == n_steps - 1))
        backend.step(
            values["param"],
            grad,
            values["ema"],
            lr=torch.tensor(0.1, dtype=torch.float64, device=DEVICE),  # moves a 16-bit θ ≈ 1 (ulp 2⁻⁷)
            weight_decay=1e-2,
            beta=0.25,
            grad_scale=grad_scale,
            found_inf=None if found is None else found.to(DEVICE),
            nonfinite=nonfinite,
            momentum_buffer=None if momentum == "none" else values["momentum"],
            momentum=0.0 if momentum == "none" else 0.9,
            nesterov=momentum == "nesterov",
            second_moment=values["second_moment"],
            bias_correction=torch.tensor(1 - BETA2 ** (step + 1), dtype=torch.float64, device=DEVICE),
            beta2=BETA2,
            eps=EPS,
        )
    return int(nonfinite)


@pytest.mark.parametrize(("backend", "n"), CASES)
@pytest.mark.parametrize("dtype", list(STEP_TOLERANCE), ids=str)
@pytest.mark.parametrize("momentum", ["none", "heavy_ball", "nesterov"])
@pytest.mark.parametrize("amp", ["plain", "scaled", "found_inf"])
def test_preconditioned_step_matches_eager(backend: str, n: int, dtype: torch.dtype, momentum: str, amp: str) -> None:
    want, got, before = (inputs(n, dtype, bad=True) for _ in range(3))
    skipped_want = steps("eager", want, momentum=momentum, amp=amp)
    skipped_got = steps(backend, got, momentum=momentum, amp=amp)
    assert skipped_got == skipped_want
    if n > 3:
        assert skipped_want == 2 * (2 if amp == "found_inf" else 3)  # two bad values a step, not the skipped step
    exact = dtype in (torch.float32, torch.float64) or backend == "cpp"
    for name in ("param", "ema", "momentum", "second_moment"):
        if exact:
            assert same_bits(got[name], want[name]), name
        else:
            tolerance = {key: 3 * value for key, value in STEP_TOLERANCE[dtype].items()}
            torch.testing.assert_close(got[name], want[name], **tolerance, equal_nan=True)
        moved = name != "momentum" or momentum != "none"
        if n and moved:
            assert not torch.equal(got[name], before[name]), name  # not two untouched copies compared
    if n > 3:  # a skipped element keeps every bit of its state
        for name in ("param", "ema", "momentum", "second_moment"):
            assert same_bits(got[name][1:2], before[name][1:2]), name


@pytest.mark.parametrize("backend", ["eager", *BACKENDS_ON_DEVICE])
@pytest.mark.parametrize("momentum", ["none", "heavy_ball"])
def test_preconditioned_step_values(backend: str, momentum: str) -> None:
    """The formulas on numbers exact in binary: β₂ = 0.75, c = 0.25, ε = 0, d = 2 (grad), v = 4, θ = 1, lr = 0.5,
    μ = 0.5, m = 0, g = 0, β = 0.5. v ← 0.75·4 + 0.25·4 = 4; u = 2 / √(4 / 0.25) = 0.5; m ← 0 + 0.5·(0.5 − 0) = 0.25;
    θ ← 1 − 0.5·u (no momentum: 0.75) or 1 − 0.5·m (0.875); g ← 0 + 0.5·(2 − 0) = 1 (the raw gradient's average)."""
    param, grad, ema, m, v = (torch.tensor([x], device=DEVICE) for x in (1.0, 2.0, 0.0, 0.0, 4.0))
    load_backend(backend, DEVICE).step(
        param,
        grad,
        ema,
        lr=torch.tensor(0.5, dtype=torch.float64, device=DEVICE),
        weight_decay=0.0,
        beta=0.5,
        momentum_buffer=None if momentum == "none" else m,
        momentum=0.0 if momentum == "none" else 0.5,
        second_moment=v,
        bias_correction=torch.tensor(0.25, dtype=torch.float64, device=DEVICE),
        beta2=0.75,
        eps=0.0,
    )
    assert v.item() == 4.0 and ema.item() == 1.0
    assert param.item() == (0.75 if momentum == "none" else 0.875)
    if momentum != "none":
        assert m.item() == 0.25


@pytest.mark.parametrize("backend", ["eager", *BACKENDS_ON_DEVICE])
@pytest.mark.parametrize(
    ("missing", "message"), [("bias_correction", "needs its bias_correction"), ("beta2", "needs beta2 in")]
)
def test_second_moment_needs_its_arguments(backend: str, missing: str, message: str) -> None:
    """Without its bias correction, or with the default β₂ = 0, the step refuses before writing anything."""
    param, grad, ema, v = (torch.ones(4, device=DEVICE) for _ in range(4))
    arguments = dict(bias_correction=torch.tensor(0.5, dtype=torch.float64, device=DEVICE), beta2=BETA2, eps=EPS)
    del arguments[missing]
    with pytest.raises(ValueError, match=message):
        load_backend(backend, DEVICE).step(
            param, grad, ema, lr=torch.tensor(0.5, dtype=torch.float64, device=DEVICE), weight_decay=0.0, beta=0.5,
            second_moment=v, **arguments,
        )  # fmt: skip
    assert torch.equal(param, torch.ones(4, device=DEVICE)) and torch.equal(v, torch.ones(4, device=DEVICE))


def measure_inputs(n: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """param, ema, prev_params, prev_ema, second moment."""
    generator = torch.Generator().manual_seed(3)
    state = torch.float64 if dtype == torch.float64 else torch.float32
    tensors = [torch.randn(n, generator=generator, dtype=torch.float64) for _ in range(5)]
    tensors[4] = tensors[4].square() * 1e-3
    return [t.to(DEVICE, kind) for t, kind in zip(tensors, (dtype, state, dtype, state, state))]


@pytest.mark.parametrize("backend", BACKENDS_ON_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [0, 1, 1000 + 37])
def test_preconditioned_measure_matches_eager(backend: str, dtype: torch.dtype, n: int) -> None:
    """The first sum is Σ Δθ²·(√(v/c) + ε); the others and the pass's writes are the plain pass's."""
    correction = torch.tensor(1 - BETA2**7, dtype=torch.float64, device=DEVICE)
    sums = {}
    for name in ("eager", backend):
        param, ema, prev_params, prev_ema, v = values = measure_inputs(n, dtype)
        sums[name] = load_backend(name, DEVICE).epoch_measure(
            param, ema, prev_params, prev_ema, second_moment=v, bias_correction=correction, eps=EPS
        )
        plain = measure_inputs(n, dtype)
        plain_sums = load_backend(name, DEVICE).epoch_measure(*plain[:4])
        assert all(torch.equal(a, b) for a, b in zip(values, plain)), name  # the same writes, v untouched
        torch.testing.assert_close(sums[name][1:], plain_sums[1:], rtol=0, atol=0)
    original = measure_inputs(n, dtype)
    delta = original[0].double() - original[2].double()
    # numpy's sqrt is correctly rounded, as the kernels' (torch's CPU one is not).
    root = torch.from_numpy(numpy.sqrt((original[4] / correction.to(original[4].dtype)).cpu().numpy())).to(DEVICE)
    metric = (root + EPS).double()
    torch.testing.assert_close(sums["eager"][0], (delta * delta * metric).sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(sums[backend][:2], sums["eager"][:2], rtol=1e-9, atol=1e-12)
    # The norms may be summed in the state dtype (base.Backend.epoch_measure).
    torch.testing.assert_close(sums[backend][2:], sums["eager"][2:], rtol=1e-5, atol=1e-9)
    if n > 1:
        assert not torch.equal(sums[backend][0], plain_sums[0])  # the metric changed the first sum


def test_triton_partials_take_the_metric() -> None:
    """The partials a decision kernel adds itself carry the preconditioned first sum too."""
    if "triton" not in BACKENDS_ON_DEVICE:
        pytest.skip("Triton is not installed")
    from bbfused.backends import triton_backend

    correction = torch.tensor(1 - BETA2**7, dtype=torch.float64, device=DEVICE)
    measured = measure_inputs(1000 + 37, torch.float32)
    want = load_backend("eager", DEVICE).epoch_measure(
        *measured[:4], second_moment=measured[4], bias_correction=correction, eps=EPS
    )
    parted = measure_inputs(1000 + 37, torch.float32)
    partials = triton_backend.TritonBackend().epoch_measure_partials(
        [tuple(parted)], bias_correction=correction, eps=EPS
    )
    torch.testing.assert_close(partials.sum(1), want, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------ whole runs
def preconditioned_run(backend: str, dtype: torch.dtype, add_group_at: int | None = None, unfreeze_at: int = 0):
    """Six epochs of four steps on a noisy quadratic, with the loss given; two groups (one added at step
    ``add_group_at`` when given); the last parameter frozen until step ``unfreeze_at`` (it then steps with its own
    count). Returns the optimizer and its parameters."""
    shapes = SIZES_SEVERAL + [(1000 + 37,)]
    params = make_params(shapes, dtype)
    half = len(params) // 2
    first = params[:half] if add_group_at is not None else params
    groups = [{"params": first, "weight_decay": 1e-3}]
    if add_group_at is None:
        groups = [{"params": params[:half], "weight_decay": 1e-3}, {"params": params[half:], "weight_decay": 0.0}]
    opt = BB(groups, lr=0.05, steps_per_epoch=4, epochs=6, backend=backend, preconditioner="adam")
    curvature = [torch.linspace(0.5, 2.0, p.numel(), dtype=torch.float64).reshape(p.shape) for p in params]
    generator = torch.Generator().manual_seed(0)
    params[-1].requires_grad_(unfreeze_at == 0)
    for step in range(6 * 4):
        if step == add_group_at:
            opt.add_param_group({"params": params[half:], "weight_decay": 0.0})
        if step == unfreeze_at:
            params[-1].requires_grad_(True)
        active = params if add_group_at is None or step >= add_group_at else first
        opt.zero_grad()
        loss = 0
        for p, c in zip(active, curvature):
            noise = 0.1 * torch.randn(p.shape, generator=generator, dtype=torch.float64)
            theta = p.double()
            loss = loss + (0.5 * c.to(DEVICE) * theta * theta + noise.to(DEVICE) * theta).sum()
        loss.backward()
        opt.step(loss=loss)
    return opt, params


@pytest.mark.parametrize("backend", BACKENDS_ON_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    ("add_group_at", "unfreeze_at"), [(None, 0), (6, 0), (None, 7)], ids=["two_groups", "group_added", "unfrozen"]
)
def test_preconditioned_trajectory_matches_eager(
    backend: str, dtype: torch.dtype, add_group_at: int | None, unfreeze_at: int
) -> None:
    """Whole epochs: the step, the measuring pass in the preconditioner's metric and the rate control's decisions,
    every state buffer (the second moments included) against eager; "unfrozen": a parameter that missed 7 of its
    group's steps steps in a launch of its own, with its own count."""
    (eager, eager_params), (fused, fused_params) = (
        preconditioned_run(name, dtype, add_group_at, unfreeze_at) for name in ("eager", backend)
    )
    assert len(set(eager.lr_history)) > 2  # the rate moved
    torch.testing.assert_close(torch.tensor(fused.lr_history), torch.tensor(eager.lr_history), rtol=1e-5, atol=0)
    assert_state_close(eager, fused, eager_params, fused_params, rtol=1e-4, atol=1e-6)
    for pe, pf in zip(eager_params, fused_params):
        torch.testing.assert_close(fused.state[pf]["exp_avg_sq"], eager.state[pe]["exp_avg_sq"], rtol=1e-4, atol=1e-9)
        if pe.numel():
            assert bool((eager.state[pe]["exp_avg_sq"] > 0).any())
    powers = fused.state_dict()["bb"]["beta2_powers"]
    assert powers == eager.state_dict()["bb"]["beta2_powers"]
    steps = [24, 24] if add_group_at is None else [24, 24 - add_group_at]
    assert powers == pytest.approx([BETA2**t for t in steps], rel=1e-12)
    lags = fused.state_dict()["bb"]["beta2_lags"]
    assert lags == eager.state_dict()["bb"]["beta2_lags"] and lags[-1][-1] == unfreeze_at


@pytest.mark.parametrize("backend", ["eager", *BACKENDS_ON_DEVICE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_overflowing_square_is_skipped(backend: str, dtype: torch.dtype) -> None:
    """A finite d whose square overflows would make v infinite and freeze the element for good: it is skipped (θ, g,
    m, v kept) and counted, as a non-finite d is."""
    huge = 1e20 if dtype == torch.float32 else 1e160
    values = {name: torch.ones(3, dtype=dtype, device=DEVICE) for name in ("param", "ema", "momentum", "v")}
    grad = torch.tensor([0.5, huge, float("nan")], dtype=dtype, device=DEVICE)
    before = {name: value.clone() for name, value in values.items()}
    nonfinite = torch.zeros((), dtype=torch.int64, device=DEVICE)
    load_backend(backend, DEVICE).step(
        values["param"], grad, values["ema"], lr=torch.tensor(0.1, dtype=torch.float64, device=DEVICE),
        weight_decay=0.0, beta=0.5, nonfinite=nonfinite, momentum_buffer=values["momentum"], momentum=0.9,
        second_moment=values["v"], bias_correction=torch.tensor(0.5, dtype=torch.float64, device=DEVICE),
        beta2=BETA2, eps=EPS,
    )  # fmt: skip
    assert int(nonfinite) == 2
    for name, value in values.items():
        assert same_bits(value[1:], before[name][1:]), name  # the huge and the NaN element kept every bit
        assert not torch.equal(value[:1], before[name][:1]), name  # the ordinary one moved
        assert torch.isfinite(value).all(), name
