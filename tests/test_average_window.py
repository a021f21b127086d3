"""BB's gradient average over the last quarter of each epoch, started from the momentum buffer
(``bbfused.average_window``): the modes each step takes, every backend's three modes against eager's, and the
optimizer's windowed run against the full average overwritten by m where the window opens."""

from __future__ import annotations

import pytest
import torch

from bbfused import BB
from bbfused.average_window import EMA_FROM_MOMENTUM, EMA_KEEP, EMA_UPDATE, AverageWindow
from bbfused.backends import load_backend
from bbfused.control.safeguard import AVERAGE_WINDOW

MODES = {"update": EMA_UPDATE, "keep": EMA_KEEP, "from_momentum": EMA_FROM_MOMENTUM}
# On a GPU (benchmarks/gpu_check.py runs this file there) the tensors live on it, and the C++ backend does not run.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FUSED = ["triton"] if DEVICE.type == "cuda" else ["cpp", "triton"]


def test_the_window_is_the_last_quarter_of_each_epoch_after_the_first() -> None:
    window = AverageWindow(AVERAGE_WINDOW)
    # T = 8: 6 steps before the window, its first after 6 steps, then 1 more. T = 9: ⌈9/4⌉ = 3 steps in it.
    assert [window.mode(1, taken, 8) for taken in range(8)] == [EMA_KEEP] * 6 + [EMA_FROM_MOMENTUM, EMA_UPDATE]
    assert [window.mode(3, taken, 9) for taken in range(9)] == [EMA_KEEP] * 6 + [EMA_FROM_MOMENTUM] + [EMA_UPDATE] * 2
    assert [window.mode(0, taken, 8) for taken in range(8)] == [EMA_UPDATE] * 8  # the first epoch's short periods
    assert [window.mode(2, taken, 1) for taken in range(1)] == [
        EMA_FROM_MOMENTUM
    ]  # one step an epoch: g ← m + β·(d − m)
    assert window.mode(1, 0, None) == EMA_UPDATE  # end_epoch() closes epochs: where the window opens is not known
    assert AverageWindow(None).mode(1, 0, 8) == EMA_UPDATE  # the paper's method, the Adam-scaled mode, no momentum


def test_the_device_counts_give_the_host_counts_modes() -> None:
    window = AverageWindow(AVERAGE_WINDOW)
    for steps in (1, 2, 5, 8, 13):
        for epoch in (0, 1, 4):
            for taken in range(steps):
                on_device = window.mode(torch.tensor(epoch), torch.tensor(taken), steps)
                assert on_device.dtype == torch.int32 and on_device.dim() == 0
                assert int(on_device) == window.mode(epoch, taken, steps), (steps, epoch, taken)


def _step_inputs(n: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def draw() -> torch.Tensor:
        return torch.randn(n, generator=generator, dtype=torch.float64).to(DEVICE, dtype)

    grad = draw()
    if n > 3:
        grad[3] = float("nan")  # a skipped element
        grad[n // 2] = float("inf")
    return {"param": draw(), "grad": grad, "ema": draw(), "momentum_buffer": draw()}


def _run_step(backend_name: str, inputs: dict, mode, *, skip: bool, found_inf: float, nesterov: bool) -> dict:
    copies = {name: tensor.clone() for name, tensor in inputs.items()}
    load_backend(backend_name, DEVICE).step(
        copies["param"],
        copies["grad"],
        copies["ema"],
        lr=torch.tensor(0.05, dtype=torch.float64, device=DEVICE),
        weight_decay=1e-3,
        beta=0.2,
        found_inf=torch.tensor([found_inf], device=DEVICE),
        nonfinite=torch.zeros((), dtype=torch.int64, device=DEVICE) if skip else None,
        momentum_buffer=copies["momentum_buffer"],
        momentum=0.9,
        nesterov=nesterov,
        ema_mode=mode,
    )
    return copies


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bits: NaN equals NaN, and -0 differs from 0."""
    return tensor.view({torch.float32: torch.int32, torch.float64: torch.int64}[tensor.dtype])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n", [0, 1, 1037, 2 * 1024 + 48])
def test_every_backend_takes_each_mode_as_eager_does(backend, mode, as_tensor, dtype, n) -> None:
    """Bit for bit, with and without skipped elements, GradScaler's skip and Nesterov."""
    for skip, found_inf, nesterov in ((False, 0.0, False), (True, 0.0, False), (True, 1.0, False), (True, 0.0, True)):
        inputs = _step_inputs(n, dtype, seed=n)
        value = MODES[mode]
        chosen = torch.tensor(value, dtype=torch.int32, device=DEVICE) if as_tensor else value
        options = {"skip": skip, "found_inf": found_inf, "nesterov": nesterov}
        expected = _run_step("eager", inputs, chosen, **options)
        got = _run_step(backend, inputs, chosen, **options)
        for name in inputs:
            assert torch.equal(_bits(got[name]), _bits(expected[name])), (name, options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_eager_modes_leave_g_alone_or_start_it_from_m(dtype) -> None:
    inputs = _step_inputs(64, dtype, seed=1)
    ema, m = inputs["ema"], inputs["momentum_buffer"]
    kept = _run_step("eager", inputs, EMA_KEEP, skip=True, found_inf=0.0, nesterov=False)
    assert torch.equal(kept["ema"], ema)
    update = _run_step("eager", inputs, EMA_UPDATE, skip=True, found_inf=0.0, nesterov=False)
    assert torch.equal(kept["param"], update["param"]) and torch.equal(
        kept["momentum_buffer"], update["momentum_buffer"]
    )
    started = _run_step("eager", inputs, EMA_FROM_MOMENTUM, skip=True, found_inf=0.0, nesterov=False)
    d = inputs["grad"] + 1e-3 * inputs["param"]
    finite = torch.isfinite(d)
    assert torch.equal(started["ema"][finite], (m + 0.2 * (d - m))[finite])
    assert torch.equal(started["ema"][~finite], m[~finite]) and (~finite).sum() == 2  # skipped elements: g ← m
    skipped_step = _run_step("eager", inputs, EMA_FROM_MOMENTUM, skip=True, found_inf=1.0, nesterov=False)
    assert torch.equal(skipped_step["ema"], m) and torch.equal(skipped_step["param"], inputs["param"])


@pytest.mark.parametrize("backend", ["eager", *FUSED])
def test_bad_modes_name_the_modes_and_the_buffer_they_need(backend) -> None:
    step = load_backend(backend, DEVICE).step
    inputs = _step_inputs(8, torch.float32, seed=2)
    lr = torch.tensor(0.1, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match=r"EMA_UPDATE \(0\), EMA_KEEP \(1\) or EMA_FROM_MOMENTUM \(2\)"):
        step(**inputs, lr=lr, weight_decay=0.0, beta=0.1, momentum=0.9, ema_mode=3)
    with pytest.raises(ValueError, match="one int32 value"):
        step(**inputs, lr=lr, weight_decay=0.0, beta=0.1, momentum=0.9, ema_mode=torch.tensor([1, 2], device=DEVICE))
    without = {name: inputs[name] for name in ("param", "grad", "ema")}
    for mode in (EMA_KEEP, EMA_FROM_MOMENTUM, torch.tensor(EMA_KEEP, dtype=torch.int32, device=DEVICE)):
        with pytest.raises(ValueError, match="needs a momentum_buffer and no second_moment"):
            step(**without, lr=lr, weight_decay=0.0, beta=0.1, ema_mode=mode)
    preconditioned = {
        "second_moment": torch.ones(8, device=DEVICE),
        "bias_correction": torch.tensor(0.5, dtype=torch.float64, device=DEVICE),
    }
    with pytest.raises(ValueError, match="needs a momentum_buffer and no second_moment"):
        step(**inputs, **preconditioned, lr=lr, weight_decay=0.0, beta=0.1, momentum=0.9, beta2=0.999, ema_mode=1)
    assert torch.equal(inputs["ema"], _step_inputs(8, torch.float32, seed=2)["ema"])  # nothing was written


STEPS = 8


def _train(opt_kwargs: dict, epochs: int, emulate: bool = False, seed: int = 0) -> tuple[torch.nn.Module, BB, list]:
    """A small MLP for ``epochs`` epochs of STEPS steps; returns it, its optimizer and g after every step. With
    ``emulate`` the window is off and g, updated at every step, is overwritten by m before the window's first step:
    what the window computes, at the full average's cost."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(DEVICE)
    opt = BB(model.parameters(), steps_per_epoch=STEPS, backend=opt_kwargs.pop("backend", "eager"), **opt_kwargs)
    window = AverageWindow(AVERAGE_WINDOW)
    if emulate:
        opt._clock.window = AverageWindow(None)
    generator = torch.Generator().manual_seed(seed)
    averages = []
    for _ in range(epochs * STEPS):
        x = torch.randn(32, 6, generator=generator).to(DEVICE)
        y = torch.randint(0, 3, (32,), generator=generator).to(DEVICE)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if emulate and window.mode(opt.epoch, opt.step_in_epoch, STEPS) == EMA_FROM_MOMENTUM:
            for buffer in opt._buffers:
                buffer.ema.copy_(buffer.momentum)
        opt.step(loss=loss)
        averages.append(torch.cat([buffer.ema.clone() for buffer in opt._buffers]))
    return model, opt, averages


@pytest.mark.parametrize("backend", ["eager", *FUSED])
@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy_ball", "nesterov"])
def test_the_windowed_run_is_the_full_average_restarted_from_m(backend, nesterov) -> None:
    """The same weights, rates and g at each window step as a run whose g averages every step and is set to m where
    the window opens; before the window g stays as the epoch end left it (zero)."""
    model, opt, averages = _train({"lr": 0.3, "backend": backend, "nesterov": nesterov}, epochs=4)
    emulated_model, emulated, emulated_averages = _train(
        {"lr": 0.3, "backend": backend, "nesterov": nesterov}, epochs=4, emulate=True
    )
    assert opt.lr_history == emulated.lr_history and len(set(opt.lr_history)) > 1
    for a, b in zip(model.parameters(), emulated_model.parameters()):
        assert torch.equal(a, b)
    opening = AverageWindow(AVERAGE_WINDOW).opening_step(STEPS)
    for index, (got, full) in enumerate(zip(averages, emulated_averages)):
        epoch, taken = divmod(index, STEPS)  # taken + 1 steps of the epoch are done
        if epoch >= 1 and taken < opening:
            assert not got.any(), (epoch, taken)  # left alone since the epoch end zeroed it
        elif taken < STEPS - 1:  # the epoch's last step's g is zeroed by its end in both runs
            assert torch.equal(got, full), (epoch, taken)


@pytest.mark.parametrize(
    "kwargs",
    [{"momentum": 0.0}, {"safeguard": False}, {"preconditioner": "adam"}],
    ids=["no_momentum", "paper", "adam"],
)
def test_without_a_momentum_of_d_every_step_updates_g(kwargs) -> None:
    _, opt, averages = _train({"lr": 0.1, **kwargs}, epochs=2)
    assert opt._clock.window.fraction is None
    assert all(average.any() for average in averages[STEPS : 2 * STEPS - 1])


@pytest.mark.parametrize("backend", ["eager", *FUSED])
def test_the_device_clock_takes_the_host_clocks_modes(backend) -> None:
    """capturable=True computes each step's mode on the device from its counters: the same g after every step."""
    _, host, host_averages = _train({"lr": 0.3, "backend": backend}, epochs=3)
    _, device, device_averages = _train({"lr": 0.3, "backend": backend, "capturable": True}, epochs=3)
    assert host.lr_history == device.lr_history
    assert all(torch.equal(a, b) for a, b in zip(host_averages, device_averages))
