"""BB's gradient average as the mean of d over the last quarter of each epoch, read from the window's two points
(``bbfused.average_window``): the modes each step takes, every backend's four modes against eager's, the optimizer's
g against the mean of the directions it stepped along, 16-bit parameters, older checkpoints and groups added inside
a window."""

from __future__ import annotations

import copy

import pytest
import torch

from bbfused import BB
from bbfused.average_window import (
    EMA_KEEP,
    EMA_UPDATE,
    NO_WINDOW,
    WINDOW_CLOSE,
    WINDOW_OPEN,
    AverageWindow,
    point_coefficient,
)
from bbfused.backends import load_backend
from bbfused.control.safeguard import AVERAGE_WINDOW

MODES = {"update": EMA_UPDATE, "keep": EMA_KEEP, "open": WINDOW_OPEN, "close": WINDOW_CLOSE}
# On a GPU (benchmarks/gpu_check.py runs this file there) the tensors live on it, and the C++ backend does not run.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FUSED = ["triton"] if DEVICE.type == "cuda" else ["cpp", "triton"]
LR, WEIGHT_DECAY, MU, WINDOW_STEPS = 0.05, 1e-3, 0.9, 5


def test_the_window_is_the_last_quarter_of_each_epoch_after_the_first() -> None:
    window = AverageWindow(AVERAGE_WINDOW)
    # T = 8: two steps (the fewest), opened after 6. T = 9: ⌈9/4⌉ = 3 steps. T = 2 and 3: two steps.
    assert [window.mode(1, taken, 8) for taken in range(8)] == [EMA_KEEP] * 6 + [WINDOW_OPEN, WINDOW_CLOSE]
    assert [window.mode(3, taken, 9) for taken in range(9)] == [EMA_KEEP] * 6 + [WINDOW_OPEN, EMA_KEEP, WINDOW_CLOSE]
    assert [window.mode(1, taken, 3) for taken in range(3)] == [EMA_KEEP, WINDOW_OPEN, WINDOW_CLOSE]
    assert [window.mode(1, taken, 2) for taken in range(2)] == [WINDOW_OPEN, WINDOW_CLOSE]
    assert [window.window_steps(t) for t in (2, 3, 8, 9, 5005)] == [2, 2, 2, 3, 1252]
    assert [window.mode(0, taken, 8) for taken in range(8)] == [EMA_UPDATE] * 8  # the first epoch's short periods
    assert window.mode(2, 0, 1) == EMA_UPDATE and window.window_steps(1) is None  # one step an epoch: no window
    assert window.mode(1, 0, None) == EMA_UPDATE  # end_epoch() closes epochs: where the window opens is not known
    assert AverageWindow(None).mode(1, 0, 8) == EMA_UPDATE  # the paper's method, the Adam-scaled mode, no momentum
    assert [window.steps_since_opening(1, taken, 9) for taken in range(9)] == [0] * 7 + [1, 2]
    assert window.steps_since_opening(0, 8, 9) == 0


def test_the_device_counts_give_the_host_counts_modes() -> None:
    window = AverageWindow(AVERAGE_WINDOW)
    assert window.mode(torch.tensor(1), torch.tensor(0), 1) == EMA_UPDATE  # no window: the host's constant
    for steps in (2, 3, 5, 8, 13):
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
        lr=torch.tensor(LR, dtype=torch.float64, device=DEVICE),
        weight_decay=WEIGHT_DECAY,
        beta=0.2,
        found_inf=torch.tensor([found_inf], device=DEVICE),
        nonfinite=torch.zeros((), dtype=torch.int64, device=DEVICE) if skip else None,
        momentum_buffer=copies["momentum_buffer"],
        momentum=MU,
        nesterov=nesterov,
        ema_mode=mode,
        window_steps=WINDOW_STEPS,
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
@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy_ball", "nesterov"])
def test_eager_modes_keep_g_or_set_it_from_the_window_points(dtype, nesterov) -> None:
    inputs = _step_inputs(64, dtype, seed=1)
    options = {"skip": True, "found_inf": 0.0, "nesterov": nesterov}
    kept = _run_step("eager", inputs, EMA_KEEP, **options)
    assert torch.equal(kept["ema"], inputs["ema"])
    update = _run_step("eager", inputs, EMA_UPDATE, **options)
    for name in ("param", "momentum_buffer"):
        assert torch.equal(kept[name], update[name])
    point_step = torch.tensor(LR, dtype=dtype) * point_coefficient(MU, nesterov)

    def point(values: dict) -> torch.Tensor:
        return values["param"] - point_step.to(DEVICE) * values["momentum_buffer"]

    opened = _run_step("eager", inputs, WINDOW_OPEN, **options)
    assert torch.equal(opened["ema"], point(inputs)) and torch.equal(opened["param"], kept["param"])
    closed = _run_step("eager", inputs, WINDOW_CLOSE, **options)
    scale = (1.0 / (torch.tensor(LR, dtype=torch.float64) * WINDOW_STEPS)).to(dtype).to(DEVICE)
    assert torch.equal(closed["ema"], (inputs["ema"] - point(kept)) * scale)
    # The point steps as plain SGD does, z' = z − η·d: over a window's two steps g ← (z − z'') / (η·n) = (d + d') / n.
    finite = _step_inputs(3, dtype, seed=3)  # no skipped element
    started = _run_step("eager", finite, WINDOW_OPEN, **options)
    ended = _run_step("eager", {**started, "grad": finite["grad"]}, WINDOW_CLOSE, **options)
    directions = 2 * finite["grad"] + WEIGHT_DECAY * (finite["param"] + started["param"])
    torch.testing.assert_close(ended["ema"], directions / WINDOW_STEPS, rtol=1e-5, atol=1e-6)
    for mode in (WINDOW_OPEN, WINDOW_CLOSE):  # GradScaler's skip: θ and m stay, and g is still set from them
        skipped = _run_step("eager", inputs, mode, skip=True, found_inf=1.0, nesterov=nesterov)
        assert torch.equal(skipped["param"], inputs["param"])
        expected = point(inputs) if mode == WINDOW_OPEN else (inputs["ema"] - point(inputs)) * scale
        assert torch.equal(skipped["ema"], expected)


@pytest.mark.parametrize("backend", ["eager", *FUSED])
def test_bad_modes_name_the_modes_and_what_they_need(backend) -> None:
    step = load_backend(backend, DEVICE).step
    inputs = _step_inputs(8, torch.float32, seed=2)
    lr = torch.tensor(0.1, dtype=torch.float64, device=DEVICE)
    momentum = {"lr": lr, "weight_decay": 0.0, "beta": 0.1, "momentum": 0.9}
    with pytest.raises(ValueError, match=r"EMA_UPDATE \(0\), EMA_KEEP \(1\), WINDOW_OPEN \(2\) or WINDOW_CLOSE \(3\)"):
        step(**inputs, **momentum, ema_mode=4, window_steps=4)
    with pytest.raises(ValueError, match="one int32 value"):
        step(**inputs, **momentum, ema_mode=torch.tensor([1, 2], device=DEVICE), window_steps=4)
    for mode in (WINDOW_CLOSE, torch.tensor(EMA_KEEP, dtype=torch.int32, device=DEVICE)):
        for steps in (0, 1, True):
            with pytest.raises(ValueError, match="window_steps must be the window's length n >= 2"):
                step(**inputs, **momentum, ema_mode=mode, window_steps=steps)
    without = {name: inputs[name] for name in ("param", "grad", "ema")}
    for mode in (EMA_KEEP, WINDOW_OPEN, WINDOW_CLOSE, torch.tensor(EMA_KEEP, dtype=torch.int32, device=DEVICE)):
        with pytest.raises(ValueError, match="needs a momentum_buffer and no second_moment"):
            step(**without, lr=lr, weight_decay=0.0, beta=0.1, ema_mode=mode, window_steps=4)
    preconditioned = {
        "second_moment": torch.ones(8, device=DEVICE),
        "bias_correction": torch.tensor(0.5, dtype=torch.float64, device=DEVICE),
    }
    with pytest.raises(ValueError, match="needs a momentum_buffer and no second_moment"):
        step(**inputs, **preconditioned, **momentum, beta2=0.999, ema_mode=WINDOW_OPEN, window_steps=4)
    assert torch.equal(inputs["ema"], _step_inputs(8, torch.float32, seed=2)["ema"])  # nothing was written


STEPS = 12  # a window of ⌈12/4⌉ = 3 steps, opened after 9


class Recorder:
    """Trains a small MLP with BB for some steps, recording g after every step, the directions d each step took
    (grad + λ·θ, in float64) and g as the epoch end found it (before its pass moves it)."""

    def __init__(self, opt_kwargs: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        self.model.to(DEVICE, dtype)
        self.opt = BB(
            self.model.parameters(), steps_per_epoch=STEPS, weight_decay=WEIGHT_DECAY,
            backend=opt_kwargs.pop("backend", "eager"), **opt_kwargs,
        )  # fmt: skip
        self.generator = torch.Generator().manual_seed(seed)
        self.averages, self.directions, self.closed = [], [], []
        measure = self.opt._buffers.measure

        def recording_measure(clock, partials=False):
            self.closed.append(self._flat("ema"))
            return measure(clock, partials)

        self.opt._buffers.measure = recording_measure

    def _flat(self, name: str) -> torch.Tensor:
        return torch.cat([getattr(buffer, name).clone() for buffer in self.opt._buffers])

    def train(self, steps: int) -> Recorder:
        for _ in range(steps):
            x = torch.randn(32, 6, generator=self.generator).to(DEVICE, self.model[0].weight.dtype)
            y = torch.randint(0, 3, (32,), generator=self.generator).to(DEVICE)
            self.opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(self.model(x).float(), y)
            loss.backward()
            self.directions.append(self._flat("grad").double() + WEIGHT_DECAY * self._flat("param").double())
            self.opt.step(loss=loss)
            self.averages.append(self._flat("ema"))
        return self


def _window_mean(directions: list[torch.Tensor], epoch: int) -> torch.Tensor:
    opening = AverageWindow(AVERAGE_WINDOW).opening_step(STEPS)
    return torch.stack(directions[epoch * STEPS + opening : (epoch + 1) * STEPS]).mean(0)


@pytest.mark.parametrize("backend", ["eager", *FUSED])
@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy_ball", "nesterov"])
def test_g_is_the_mean_of_the_windows_directions(backend, nesterov) -> None:
    """The epoch end finds the mean of the last quarter's d; g holds the window's point from its first step on and
    is left alone before it (zero, as the last epoch end left it)."""
    run = Recorder({"lr": 0.3, "backend": backend, "nesterov": nesterov}).train(4 * STEPS)
    opt, opening = run.opt, AverageWindow(AVERAGE_WINDOW).opening_step(STEPS)
    assert len(set(opt.lr_history)) > 1 and len(run.closed) >= 4
    for epoch in (1, 2, 3):
        mean = _window_mean(run.directions, epoch)
        got = run.closed[-4 + epoch].double()
        assert (got - mean).norm() <= 1e-5 * mean.norm(), epoch
        for taken in range(opening):
            assert not run.averages[epoch * STEPS + taken].any(), (epoch, taken)
        held = run.averages[epoch * STEPS + opening : (epoch + 1) * STEPS - 1]
        assert all(torch.equal(g, held[0]) for g in held)  # the point, untouched inside the window


@pytest.mark.parametrize(
    "kwargs",
    [{"momentum": 0.0}, {"safeguard": False}, {"preconditioner": "adam"}],
    ids=["no_momentum", "paper", "adam"],
)
def test_without_a_momentum_of_d_every_step_updates_g(kwargs) -> None:
    run = Recorder({"lr": 0.1, **kwargs}).train(2 * STEPS)
    assert run.opt._clock.window.fraction is None
    assert all(average.any() for average in run.averages[STEPS : 2 * STEPS - 1])


@pytest.mark.parametrize("backend", ["eager", *FUSED])
def test_16_bit_parameters_update_g_at_every_step(backend) -> None:
    """Their rounding would bury the window's sum in its two points: their g is the full average, as without a
    window, bit for bit."""
    windowed = Recorder({"lr": 0.3, "backend": backend}, dtype=torch.bfloat16)
    plain = Recorder({"lr": 0.3, "backend": backend}, dtype=torch.bfloat16)
    plain.opt._clock.window = NO_WINDOW
    windowed.train(3 * STEPS), plain.train(3 * STEPS)
    assert windowed.opt._clock.window.fraction == AVERAGE_WINDOW
    assert all(torch.equal(a, b) for a, b in zip(windowed.averages, plain.averages))
    assert all(average.any() for average in windowed.averages[STEPS : 2 * STEPS - 1])


@pytest.mark.parametrize("backend", ["eager", *FUSED])
def test_the_device_clock_takes_the_host_clocks_modes(backend) -> None:
    """capturable=True computes each step's mode on the device from its counters: the same g after every step."""
    host = Recorder({"lr": 0.3, "backend": backend}).train(3 * STEPS)
    device = Recorder({"lr": 0.3, "backend": backend, "capturable": True}).train(3 * STEPS)
    assert host.opt.lr_history == device.opt.lr_history
    assert all(torch.equal(a, b) for a, b in zip(host.averages, device.averages))


def _resumed(run: Recorder, state: dict) -> Recorder:
    """A copy of ``run``'s model and data stream with a new optimizer loaded from ``state``."""
    resumed = Recorder({"lr": 0.3})
    resumed.model.load_state_dict(run.model.state_dict())
    resumed.opt.load_state_dict(state)
    resumed.generator.set_state(run.generator.get_state())
    return resumed


@pytest.mark.parametrize("saved_at", [STEPS + 10, STEPS + 5], ids=["inside_the_window", "before_it"])
def test_an_older_checkpoint_saved_inside_a_window_resumes_its_average(saved_at) -> None:
    """Up to version 5 g held an average of d inside the window: the next step takes it as the mean of the window's
    steps before the save, so the epoch end still finds the window's mean. Saved before the window, the run goes on
    bit for bit."""
    uninterrupted = Recorder({"lr": 0.3}).train(2 * STEPS)
    run = Recorder({"lr": 0.3}).train(saved_at)
    state = copy.deepcopy(run.opt.state_dict())
    opening = AverageWindow(AVERAGE_WINDOW).opening_step(STEPS)
    taken = saved_at - STEPS - opening
    if taken > 0:  # as version 5 would hold it: here the mean of the window's directions so far
        mean = torch.stack(run.directions[STEPS + opening : saved_at]).mean(0).float()
        for key, value in state["state"].items():
            state["state"][key]["ema"] = torch.zeros_like(value["ema"])
        offsets = 0
        for group in state["param_groups"]:
            for key in group["params"]:
                ema = state["state"][key]["ema"]
                ema.copy_(mean[offsets : offsets + ema.numel()].view_as(ema))
                offsets += ema.numel()
    state["bb"] = {key: value for key, value in state["bb"].items() if key != "window_point"}
    state["bb"]["version"] = 5
    for group in state["param_groups"]:
        group["bb"] = state["bb"]
    resumed = _resumed(run, state).train(2 * STEPS - saved_at)
    expected = _window_mean(uninterrupted.directions, 1)
    got = resumed.closed[-1].double()
    if taken > 0:
        assert (got - expected).norm() <= 1e-5 * expected.norm()
    else:
        assert torch.equal(resumed.closed[-1], uninterrupted.closed[-1])


def test_a_checkpoint_saved_inside_a_window_resumes_bit_for_bit() -> None:
    uninterrupted = Recorder({"lr": 0.3}).train(2 * STEPS)
    run = Recorder({"lr": 0.3}).train(STEPS + 10)
    state = run.opt.state_dict()
    assert state["bb"]["window_point"] is True
    resumed = _resumed(run, copy.deepcopy(state)).train(STEPS - 10)
    assert torch.equal(resumed.closed[-1], uninterrupted.closed[-1])
    for a, b in zip(resumed.model.parameters(), uninterrupted.model.parameters()):
        assert torch.equal(a, b)


def test_a_corrupt_window_point_is_refused_before_anything_is_written() -> None:
    run = Recorder({"lr": 0.3}).train(STEPS + 10)
    state = copy.deepcopy(run.opt.state_dict())
    state["bb"]["window_point"] = "yes"
    for group in state["param_groups"]:
        group["bb"] = state["bb"]
    fresh = Recorder({"lr": 0.3})
    before = [buffer.ema.clone() for buffer in fresh.opt._buffers]
    with pytest.raises(ValueError, match="window_point must be True or False"):
        fresh.opt.load_state_dict(state)
    assert all(torch.equal(a, buffer.ema) for a, buffer in zip(before, fresh.opt._buffers))


def test_a_group_added_inside_a_window_averages_the_steps_it_takes() -> None:
    run = Recorder({"lr": 0.3}).train(STEPS + 10)  # inside the second epoch's window (opened after 9 steps)
    extra = torch.nn.Parameter(torch.randn(5, device=DEVICE))
    run.opt.add_param_group({"params": [extra]})
    assert torch.equal(run.opt._buffers[-1].ema[:5], extra.detach())  # its point: θ, with m zero
    directions = []
    for _ in range(STEPS - 10):
        run.opt.zero_grad()
        x = torch.randn(32, 6, generator=run.generator).to(DEVICE)
        y = torch.randint(0, 3, (32,), generator=run.generator).to(DEVICE)
        loss = torch.nn.functional.cross_entropy(run.model(x), y) + (extra**2).sum()
        loss.backward()
        directions.append(extra.grad.double() + WEIGHT_DECAY * extra.detach().double())
        run.opt.step(loss=loss)
    window = AverageWindow(AVERAGE_WINDOW).window_steps(STEPS)
    expected = torch.stack(directions).sum(0) / window
    got = run.closed[-1][-run.opt._buffers[-1].ema.numel() :][:5].double()  # its buffer's, before its padding
    assert (got - expected).norm() <= 1e-5 * expected.norm()
