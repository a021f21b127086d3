"""The BB optimizer's semantics on the eager reference backend: the algorithm, epochs, AMP, checkpoints."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from bbfused import BB

CURVATURE_SEED = 11


def quadratic_gradient(theta: torch.Tensor, index: int, step: int) -> torch.Tensor:
    """A noisy quadratic's gradient, a pure function of θ, the tensor index and the global step."""
    generator = torch.Generator().manual_seed(1000 * step + index)
    curvature = torch.linspace(0.2, 3.0, theta.numel(), dtype=torch.float64).reshape(theta.shape)
    noise = 0.05 * torch.randn(theta.shape, generator=generator, dtype=torch.float64)
    return curvature * theta + noise


class ReferenceBB:
    """Algorithm 1 in float64, written from the issue's formulas, independently of bbfused."""

    def __init__(self, thetas, weight_decays, lr, steps, beta, tau0, tau_min, tau_max):
        self.thetas = [t.clone() for t in thetas]
        self.weight_decays = weight_decays
        self.lr, self.steps, self.beta = lr, steps, beta
        self.tau0, self.tau_min, self.tau_max = tau0, tau_min, tau_max
        self.history: list[float] = []
        self.ratios: list[float] = []

    def train(self, epochs: int) -> None:
        prev_theta = prev_g = None
        global_step = 0
        for k in range(epochs):
            g = [torch.zeros_like(t) for t in self.thetas]
            for _ in range(self.steps):
                for i, (theta, wd) in enumerate(zip(self.thetas, self.weight_decays)):
                    d = quadratic_gradient(theta, i, global_step) + wd * theta
                    self.thetas[i] = theta - self.lr * d
                    g[i] = (1 - self.beta) * g[i] + self.beta * d
                global_step += 1
            self.history.append(self.lr)
            if k >= 1:
                dtheta = torch.cat([(a - b).flatten() for a, b in zip(self.thetas, prev_theta)])
                y = torch.cat([(a - b).flatten() for a, b in zip(g, prev_g)])
                ratio = float(dtheta @ dtheta) / (self.steps * abs(float(dtheta @ y)))
                self.ratios.append(ratio)
                inside = self.tau_min / (k + 2) <= ratio <= self.tau_max / (k + 2)
                self.lr = ratio if inside else self.tau0 / (k + 2)
            prev_theta = [t.clone() for t in self.thetas]
            prev_g = [t.clone() for t in g]


def train_bb(opt: BB, params, epochs: int, steps: int) -> None:
    global_step = 0
    for _ in range(epochs * steps):
        opt.zero_grad()
        for i, p in enumerate(params):
            p.grad.copy_(quadratic_gradient(p.detach(), i, global_step))  # an in-place write counts
        opt.step()
        global_step += 1


SHAPES = [(4, 3), (7,), (0,), (2, 2, 5)]


def initial_thetas():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=generator, dtype=torch.float64) for s in SHAPES]


@pytest.mark.parametrize(
    "taus, expect_fallback",
    [((1.0, 1e-4, 1e4), False), ((1.0, 1e-4, 1e-3), True)],
    ids=["inside-bounds", "fallback"],
)
def test_eager_trajectory_matches_float64_reference(taus, expect_fallback) -> None:
    tau0, tau_min, tau_max = taus
    steps, epochs, lr, beta = 5, 6, 0.05, 0.3
    weight_decays = [1e-2, 1e-2, 0.0, 0.0]
    reference = ReferenceBB(initial_thetas(), weight_decays, lr, steps, beta, tau0, tau_min, tau_max)
    reference.train(epochs)

    params = [torch.nn.Parameter(t.clone()) for t in initial_thetas()]
    groups = [{"params": params[:2], "weight_decay": 1e-2}, {"params": params[2:], "weight_decay": 0.0}]
    opt = BB(
        groups,
        lr=lr,
        steps_per_epoch=steps,
        beta=beta,
        tau0=tau0,
        tau_min=tau_min,
        tau_max=tau_max,
        backend="eager",
        safeguard=False,  # the paper's method: the float64 reference implements eq. 13 exactly
    )
    train_bb(opt, params, epochs, steps)

    assert opt.epoch == epochs
    torch.testing.assert_close(torch.tensor(opt.lr_history), torch.tensor(reference.history), rtol=1e-12, atol=0)
    for p, theta in zip(params, reference.thetas):
        torch.testing.assert_close(p.detach(), theta, rtol=1e-12, atol=1e-14)
    fallbacks = [tau0 / (k + 2) for k in range(1, epochs)]
    chosen = reference.history[2:] + [reference.lr]
    if expect_fallback:
        assert chosen == fallbacks
    else:
        assert chosen == reference.ratios and all(c != f for c, f in zip(chosen, fallbacks))
    assert opt.lr == pytest.approx(reference.lr, rel=1e-12)
    assert reference.history[0] == reference.history[1] == lr
    for group in opt.param_groups:  # learning-rate monitors read the current rate from the groups
        assert float(group["lr"]) == opt.lr


def test_default_beta_and_paper_defaults() -> None:
    """beta defaults to 4/T in both modes; the taus default to the paper's (1, 0.1, 10) in its mode, and to the
    default control's rate bounds [1e-4, 100] without a fallback rate otherwise."""
    opt = BB([torch.nn.Parameter(torch.ones(3))], lr=0.1, steps_per_epoch=400, backend="eager")
    assert opt.beta == pytest.approx(4 / 400)
    assert (opt.tau0, opt.tau_min, opt.tau_max) == (None, 1e-4, 100.0)
    paper = BB([torch.nn.Parameter(torch.ones(3))], lr=0.1, steps_per_epoch=400, backend="eager", safeguard=False)
    assert paper.beta == pytest.approx(4 / 400)
    assert (paper.tau0, paper.tau_min, paper.tau_max) == (1.0, 0.1, 10.0)
    short = BB([torch.nn.Parameter(torch.ones(3))], lr=0.1, steps_per_epoch=2, backend="eager")
    assert short.beta == 1.0  # 4/T capped to the valid range


def test_zero_ratio_takes_fallback() -> None:
    """Parameters that do not move make ‖Δθ‖² = 0 and 0/0: the paper's fallback τ0/(k+2) applies, no NaN; the
    default keeps the rate (within the bounds) instead of jumping to an absolute fallback."""
    p = torch.nn.Parameter(torch.ones(5))
    opt = BB([p], lr=0.5, steps_per_epoch=1, backend="eager", tau0=2.0, safeguard=False)
    for _ in range(3):
        p.grad.zero_()
        opt.step()
    assert opt.lr_history == [0.5, 0.5, 2.0 / 3]
    assert opt.lr == pytest.approx(2.0 / 4)
    p = torch.nn.Parameter(torch.ones(5))
    default = BB([p], lr=0.5, steps_per_epoch=1, backend="eager")  # no tau0: the default control has none
    for _ in range(3):
        p.grad.zero_()
        default.step()
    assert default.lr_history == [0.5, 0.5, 0.5] and default.lr == 0.5


@pytest.mark.parametrize(
    "steps, safeguard",
    [(3, True), (4, False)],
    ids=["default-unsplit", "paper"],
)
def test_manual_boundaries_equal_automatic(steps: int, safeguard: bool) -> None:
    """Epochs ended by end_epoch() run exactly as epochs of steps_per_epoch steps. The default control splits an
    automatic first epoch into periods only when it holds two periods of at least 2 steps (T >= 4), and with momentum
    takes g as the mean of d over the last quarter of each later epoch (bbfused.average_window), both of which a
    manual run cannot know in advance: T = 3 has no split, and without momentum no window, so the two runs are the
    same there."""
    runs = []
    for manual in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in initial_thetas()]
        options = {"lr": 0.05, "beta": 0.3, "backend": "eager", "safeguard": safeguard, "momentum": 0.0}
        if manual:
            opt = BB(params, **options)
        else:
            opt = BB(params, steps_per_epoch=steps, **options)
        step = 0
        for _ in range(4):
            for _ in range(steps):
                for i, p in enumerate(params):
                    p.grad.copy_(quadratic_gradient(p.detach(), i, step))
                opt.step()
                step += 1
            if manual:
                opt.end_epoch()
        runs.append((opt.lr_history, [p.detach().clone() for p in params], opt.epoch))
    assert runs[0][0] == runs[1][0] and runs[0][2] == runs[1][2] == 4
    assert len(set(runs[0][0])) > 1  # the rule moved the rate: the epoch ends took part
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


def test_boundary_mode_contradictions_raise() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    automatic = BB([p], lr=0.1, steps_per_epoch=5, backend="eager")
    with pytest.raises(RuntimeError, match="steps_per_epoch=None"):
        automatic.end_epoch()
    assert automatic.epoch == 0
    manual = BB([torch.nn.Parameter(torch.ones(3))], lr=0.1, beta=0.5, backend="eager")
    with pytest.raises(RuntimeError, match="no step"):
        manual.end_epoch()
    assert manual.epoch == 0
    # The missing steps_per_epoch is named first; beta only for the end_epoch() way.
    with pytest.raises(
        ValueError, match=r"^steps_per_epoch is missing: pass steps_per_epoch=len\(loader\).*beta is required"
    ):
        BB([torch.nn.Parameter(torch.ones(3))], lr=0.1, backend="eager")


def test_step_returns_closure_loss() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = BB([p], lr=0.1, steps_per_epoch=3, momentum=0.0, backend="eager")  # a plain SGD step to compare with

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.0)
    torch.testing.assert_close(p.detach(), torch.tensor([0.8, -1.6]))


def test_grad_is_not_modified_by_weight_decay() -> None:
    p = torch.nn.Parameter(torch.full((4,), 2.0))
    opt = BB([p], lr=0.1, steps_per_epoch=3, weight_decay=0.5, momentum=0.0, backend="eager")  # plain SGD step
    p.grad.fill_(1.0)
    opt.step()
    assert torch.equal(p.grad, torch.ones(4))
    torch.testing.assert_close(p.detach(), torch.full((4,), 2.0 - 0.1 * (1.0 + 0.5 * 2.0)))


# ----------------------------------------------------------------------------------------------- AMP
def test_grad_scaler_with_injected_inf() -> None:
    """A scaled step is the unscaled step (here with the default momentum 0.9, in its EMA form from a zero buffer:
    m = 0.1·d, θ ← θ − lr·m); a step with an inf gradient writes nothing (θ, EMA, momentum) and still counts."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    # T = 16: the first rate period is 4 steps, so no period end (which restarts the EMA) follows the two steps.
    opt = BB(model.parameters(), lr=0.1, steps_per_epoch=16, backend="eager")
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    x = torch.randn(8, 4)

    def scaled_step(inject_inf: bool) -> None:
        opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        if inject_inf:
            model.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()

    reference = torch.nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    scaled_step(False)
    reference_loss = reference(x).square().mean()
    reference_loss.backward()
    momentum = 0.9
    with torch.no_grad():
        for p in reference.parameters():
            buffer = torch.zeros_like(p)
            buffer += (1 - momentum) * (p.grad - buffer)
            p -= 0.1 * buffer
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], (1 - momentum) * q.grad, rtol=1e-6, atol=1e-7)

    before = [p.detach().clone() for p in model.parameters()]
    ema_before = [opt.state[p]["ema"].clone() for p in model.parameters()]
    momentum_before = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    scaled_step(True)
    for p, theta, ema, buffer in zip(model.parameters(), before, ema_before, momentum_before):
        assert torch.equal(p.detach(), theta)
        assert torch.equal(opt.state[p]["ema"], ema)
        assert torch.equal(opt.state[p]["momentum_buffer"], buffer)
    assert opt.step_in_epoch == 2  # the skipped step still counts towards the epoch
    assert scaler.get_scale() == 128.0
    assert not hasattr(opt, "found_inf")


# -------------------------------------------------------------------------------------- checkpoints
def _model_and_opt(backend: str = "eager", device: str = "cpu"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(device)
    groups = [
        {"params": [model[0].weight, model[2].weight], "weight_decay": 1e-3},
        {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0},
    ]
    return model, BB(groups, lr=0.2, steps_per_epoch=4, backend=backend)


def _train_steps(model, opt, start: int, count: int) -> None:
    for step in range(start, start + count):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(16, 6, generator=generator).to(next(model.parameters()).device)
        y = torch.randint(0, 3, (16,), generator=generator).to(x.device)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_mid_epoch_resume_is_bit_identical() -> None:
    model, opt = _model_and_opt()
    _train_steps(model, opt, 0, 22)
    uninterrupted = ([p.detach().clone() for p in model.parameters()], opt.lr_history, opt.lr)

    model, opt = _model_and_opt()
    _train_steps(model, opt, 0, 10)  # stops in the middle of epoch 2
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    assert opt.state_dict()["bb"]["step_in_epoch"] == 2

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model, opt = _model_and_opt()
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    assert (opt.epoch, opt.step_in_epoch) == (2, 2)
    _train_steps(model, opt, 10, 12)
    assert opt.lr_history == uninterrupted[1] and opt.lr == uninterrupted[2]
    for p, q in zip(model.parameters(), uninterrupted[0]):
        assert torch.equal(p.detach(), q)


def test_state_dict_layout_is_per_parameter_and_round_trips() -> None:
    model, opt = _model_and_opt()
    _train_steps(model, opt, 0, 9)
    state = opt.state_dict()
    assert sorted(state["state"]) == [0, 1, 2, 3]
    for index, p in enumerate([model[0].weight, model[2].weight, model[0].bias, model[2].bias]):
        for key in ("ema", "prev_params", "prev_ema"):
            assert state["state"][index][key].shape == p.shape
    assert state["param_groups"][0]["lr"] == opt.lr
    assert state["param_groups"][1]["weight_decay"] == 0.0
    other_model, other = _model_and_opt()
    other.load_state_dict(state)
    again = other.state_dict()
    assert again["bb"] == state["bb"]
    for index in state["state"]:
        for key, value in state["state"][index].items():
            assert torch.equal(again["state"][index][key], value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_checkpoint_loads_on_cuda() -> None:
    model, opt = _model_and_opt()
    _train_steps(model, opt, 0, 6)
    cuda_model, cuda_opt = _model_and_opt(device="cuda")
    cuda_opt.load_state_dict(opt.state_dict())
    for p, q in zip(model.parameters(), cuda_model.parameters()):
        torch.testing.assert_close(cuda_opt.state[q]["ema"].cpu(), opt.state[p]["ema"])
    assert cuda_opt.lr == opt.lr


def test_load_state_dict_rejects_other_models_before_writing() -> None:
    model, opt = _model_and_opt()
    _train_steps(model, opt, 0, 5)
    state = opt.state_dict()
    small = torch.nn.Linear(6, 3)
    other = BB(small.parameters(), lr=0.2, steps_per_epoch=4, backend="eager")
    with pytest.raises(ValueError, match="parameter groups"):
        other.load_state_dict(state)
    grouped_model, grouped = _model_and_opt()
    bad = opt.state_dict()
    bad["state"][3]["ema"] = torch.zeros(5)
    ema_before = grouped.state[grouped_model[0].weight]["ema"].clone()
    with pytest.raises(ValueError, match="shape"):
        grouped.load_state_dict(bad)
    assert torch.equal(grouped.state[grouped_model[0].weight]["ema"], ema_before)
    assert grouped.epoch == 0
    plain = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
    with pytest.raises(ValueError, match="not a bbfused.BB state dict"):
        grouped.load_state_dict(plain)


def test_state_entries_that_are_not_parameters_round_trip_as_in_torch_optim() -> None:
    """torch.optim keeps an ``opt.state`` entry that is no parameter (what a state-dict pre hook adds) in the state
    dict under its own key, and load_state_dict puts it back: BB does what torch.optim.SGD does."""
    results = []
    for make in (
        lambda params: torch.optim.SGD(params, lr=0.1),
        lambda params: BB(params, lr=0.1, steps_per_epoch=4, backend="eager"),
    ):
        model = torch.nn.Linear(3, 2)
        opt = make(list(model.parameters()))
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        opt.state["note"] = {"epoch": 3}
        state = opt.state_dict()
        fresh = make(list(torch.nn.Linear(3, 2).parameters()))
        fresh.load_state_dict(state)
        results.append((sorted(state["state"], key=str), state["state"]["note"], fresh.state["note"]))
    (sgd_keys, *sgd_note), (bb_keys, *bb_note) = results
    assert bb_note == sgd_note == [{"epoch": 3}, {"epoch": 3}]
    assert (sgd_keys, bb_keys) == (["note"], [0, 1, "note"])  # SGD without momentum keeps no state per parameter


# ------------------------------------------------------------------------------------ flat buffers
def test_parameters_and_gradients_are_views_of_flat_buffers() -> None:
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    linear = torch.nn.Linear(5, 4)
    params = [conv.weight, conv.bias, linear.weight, linear.bias]
    originals = [p.detach().clone() for p in params]
    strides = [p.stride() for p in params]
    ids = [id(p) for p in params]
    opt = BB(params, lr=0.1, steps_per_epoch=3, backend="eager")
    (buffer,) = opt._buffers
    base = buffer.param.data_ptr()
    end = base + buffer.numel * buffer.param.element_size()
    assert [id(p) for p in params] == ids
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    for p, original, stride, offset in zip(params, originals, strides, buffer.offsets):
        assert torch.equal(p.detach(), original)
        assert p.stride() == stride
        assert base <= p.data_ptr() < end and p.data_ptr() == base + offset * p.element_size()
        assert offset % 16 == 0
        assert p.grad.data_ptr() == buffer.grad.data_ptr() + offset * p.element_size()
        assert p.grad.stride() == stride
    # backward accumulates into the flat gradient buffer
    conv(torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)).sum().backward()
    assert torch.count_nonzero(buffer.grad) > 0
    assert conv.weight.grad.data_ptr() == buffer.grad.data_ptr()


def test_zero_grad_fills_buffer_in_place() -> None:
    p = torch.nn.Parameter(torch.ones(10))
    opt = BB([p], lr=0.1, steps_per_epoch=3, backend="eager")
    view = p.grad
    (p * 3).sum().backward()
    opt.zero_grad(set_to_none=True)
    assert p.grad is view and torch.count_nonzero(p.grad) == 0


def test_replaced_gradient_is_copied_in_with_one_warning() -> None:
    model = torch.nn.Linear(3, 2)
    # Plain SGD steps; T = 16: no period end (whose weight-growth test would roll these steps back) after step 2.
    opt = BB(model.parameters(), lr=0.5, steps_per_epoch=16, momentum=0.0, backend="eager")
    view = model.weight.grad
    before = model.weight.detach().clone()
    for round_ in range(2):
        model.zero_grad(set_to_none=True)  # torch's default: the grads become None, backward makes new ones
        model(torch.ones(1, 3)).sum().backward()
        assert model.weight.grad is not view
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        replaced_warnings = [w for w in caught if "replaced" in str(w.message)]
        assert len(replaced_warnings) == (1 if round_ == 0 else 0)
        assert model.weight.grad is view
    torch.testing.assert_close(model.weight.detach(), before - 2 * 0.5 * torch.ones(2, 3))


def test_step_without_gradients_changes_nothing_but_counts() -> None:
    model = torch.nn.Linear(3, 2)
    opt = BB(model.parameters(), lr=0.5, steps_per_epoch=10, weight_decay=0.1, momentum=0.0, backend="eager")
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    opt.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)
    assert opt.step_in_epoch == 1
    opt.zero_grad(set_to_none=False)  # no gradient before: still none, as torch.optim keeps None grads
    opt.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)
    model(torch.ones(1, 3)).sum().backward()
    opt.zero_grad(set_to_none=False)  # zeroed, but present: weight decay applies as in torch.optim
    opt.step()
    torch.testing.assert_close(model.weight.detach(), before[0] * (1 - 0.5 * 0.1))


def test_frozen_then_unfrozen_parameter() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    opt = BB(model.parameters(), lr=0.1, steps_per_epoch=100, momentum=0.0, backend="eager")  # plain SGD steps
    frozen_before = model[0].weight.detach().clone()
    model[0].requires_grad_(False)
    for _ in range(2):
        opt.zero_grad()
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
    assert torch.equal(model[0].weight.detach(), frozen_before)
    model[0].requires_grad_(True)
    opt.zero_grad()
    model(torch.ones(2, 3)).sum().backward()
    expected = model[0].weight.detach() - 0.1 * model[0].weight.grad
    opt.step()
    torch.testing.assert_close(model[0].weight.detach(), expected)


def test_reallocated_parameter_raises_naming_the_fix() -> None:
    model = torch.nn.Linear(3, 2)
    opt = BB(model.named_parameters(), lr=0.1, steps_per_epoch=3, backend="eager")
    model.double()
    model(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    with pytest.raises(RuntimeError, match=r"'weight' was re-allocated.*construct the optimizer"):
        opt.step()


def test_zero_element_parameters() -> None:
    params = [
        torch.nn.Parameter(torch.zeros(0)),
        torch.nn.Parameter(torch.ones(3)),
        torch.nn.Parameter(torch.ones(0, 4)),
    ]
    opt = BB(params, lr=0.1, steps_per_epoch=2, backend="eager")
    for _ in range(4):
        opt.zero_grad()
        (params[1] * 2).sum().backward()
        opt.step()
    assert opt.epoch == 2 and params[0].shape == (0,) and params[2].shape == (0, 4)
    assert math.isfinite(opt.lr)


# ---------------------------------------------------------------------------------------- bad input
def _param():
    return [torch.nn.Parameter(torch.ones(3))]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(lr=0.0), ValueError, "lr must be"),
        (dict(lr=-1.0), ValueError, "lr must be"),
        (dict(lr=float("nan")), ValueError, "lr must be"),
        (dict(steps_per_epoch=0), ValueError, "steps_per_epoch"),
        (dict(steps_per_epoch=-3), ValueError, "steps_per_epoch"),
        (dict(steps_per_epoch=2.5), ValueError, "steps_per_epoch"),
        (dict(beta=0.0), ValueError, "beta must be in"),
        (dict(beta=1.5), ValueError, "beta must be in"),
        (dict(weight_decay=-1e-4), ValueError, "weight_decay must be"),
        (dict(tau0=0.0), ValueError, "tau0"),
        (dict(tau_min=-0.1), ValueError, "tau_min"),
        (dict(tau_max=0.0), ValueError, "tau_max"),
        (dict(tau_min=2.0, tau_max=1.0), ValueError, "tau_min .* must be <= tau_max"),
        (dict(backend="cuda-magic"), ValueError, "unknown backend 'cuda-magic'"),
        # BB's constructor checks momentum (BufferSet no longer does): before any parameter is re-pointed.
        (dict(momentum=1.0), ValueError, r"momentum must be in \[0, 1\)"),
        (dict(momentum=float("nan")), ValueError, r"momentum must be in \[0, 1\)"),
        (dict(momentum=0.0, nesterov=True), ValueError, "nesterov=True needs a momentum > 0"),
        (dict(nesterov=True, safeguard=False), ValueError, "nesterov=True needs a momentum > 0"),  # paper: none
    ],
)
def test_bad_hyperparameters_raise_before_writing(kwargs, error, match) -> None:
    params = _param()
    data_ptr = params[0].data_ptr()
    arguments = dict(lr=0.1, steps_per_epoch=10, backend="eager") | kwargs
    with pytest.raises(error, match=match):
        BB(params, **arguments)
    assert params[0].data_ptr() == data_ptr and params[0].grad is None


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: [torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))], TypeError, "real floating-point"),
        (lambda: [torch.ones(3, dtype=torch.int64)], TypeError, "real floating-point"),
        (lambda: [torch.nn.Parameter(torch.ones(3, device="meta"))], ValueError, "meta device"),
        (lambda: [{"params": _param(), "weight_decay": -1.0}], ValueError, r"weight_decay of param_groups\[0\]"),
        (lambda: [], ValueError, "empty"),
        (lambda: [{"params": []}], ValueError, "has no parameters"),
        (lambda: torch.nn.Parameter(torch.ones(3)), TypeError, "not a tensor"),
    ],
    ids=["complex", "integer", "meta", "group-weight-decay", "empty", "empty-group", "bare-tensor"],
)
def test_bad_parameters_raise(make, error, match) -> None:
    with pytest.raises(error, match=match):
        BB(make(), lr=0.1, steps_per_epoch=10, backend="eager")


def test_parameter_listed_twice_raises_naming_it() -> None:
    shared = torch.nn.Parameter(torch.ones(3))
    other = torch.nn.Parameter(torch.ones(2))
    data_ptr = shared.data_ptr()
    with pytest.raises(ValueError, match=r"listed twice"):
        BB([{"params": [shared, other]}, {"params": [shared]}], lr=0.1, steps_per_epoch=3, backend="eager")
    with pytest.raises(ValueError, match=r"params'\]\[2\].*listed twice"):
        BB([shared, other, shared], lr=0.1, steps_per_epoch=3, backend="eager")
    assert shared.data_ptr() == data_ptr


def test_sparse_gradients_raise_before_writing() -> None:
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    dense = torch.nn.Linear(3, 1)
    opt = BB([*dense.parameters(), *embedding.parameters()], lr=0.1, steps_per_epoch=3, backend="eager")
    before = dense.weight.detach().clone()
    dense(embedding(torch.tensor([1, 2]))).sum().backward()
    # backward accumulates a sparse gradient into the dense flat view; an assigned sparse one is refused
    assert not embedding.weight.grad.is_sparse
    embedding.weight.grad = torch.ones(10, 3).to_sparse()
    with pytest.raises(TypeError, match="sparse gradient"):
        opt.step()
    assert torch.equal(dense.weight.detach(), before) and opt.step_in_epoch == 0
    sparse_param = torch.nn.Parameter(torch.ones(3))
    sparse_param.grad = torch.ones(3).to_sparse()
    with pytest.raises(TypeError, match="sparse gradient"):
        BB([sparse_param], lr=0.1, steps_per_epoch=3, backend="eager")


def test_add_param_group_after_construction_adds_a_group_that_steps() -> None:
    """More in tests/test_add_param_group.py (when the group joins the BB estimate, rollbacks, checkpoints)."""
    first, added = _param(), _param()
    opt = BB(first, lr=0.1, steps_per_epoch=3, weight_decay=0.5, momentum=0.0, backend="eager")  # plain SGD step
    opt.add_param_group({"params": added})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["weight_decay"] == 0.5
    for p in first + added:
        p.grad.fill_(2.0)
    opt.step()
    for p in first + added:
        torch.testing.assert_close(p.detach(), torch.full((3,), 1 - 0.1 * (2.0 + 0.5)))


def test_nesterov_runs_with_the_default_momentum() -> None:
    """The default mode's momentum is 0.9 unless given, so nesterov=True alone asks for Nesterov momentum 0.9."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = BB([p], lr=0.1, steps_per_epoch=3, nesterov=True, backend="eager")
    assert opt.state_dict()["bb"]["momentum"] == 0.9
    p.grad.fill_(2.0)
    opt.step()
    # m = 0.1·d; the Nesterov direction is 0.1·d + 0.9·m = 0.19·d.
    torch.testing.assert_close(p.detach(), torch.full((3,), 1 - 0.1 * 0.19 * 2.0))


def test_per_group_lr_is_ignored_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="per-group lr"):
        opt = BB([{"params": _param(), "lr": 0.5}, {"params": _param()}], lr=0.1, steps_per_epoch=3, backend="eager")
    assert [float(g["lr"]) for g in opt.param_groups] == [0.1, 0.1]


def test_unavailable_explicit_backend_raises_why(monkeypatch) -> None:
    import bbfused.backends as backends

    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: "no compiler found (test)")
    with pytest.raises(backends.BackendUnavailableError, match="no compiler found"):
        BB(_param(), lr=0.1, steps_per_epoch=3, backend="cpp")


def test_active_backends_names_what_auto_chose() -> None:
    opt = BB(_param(), lr=0.1, steps_per_epoch=3, backend="eager")
    assert opt.active_backends == {"cpu": "eager"}


def test_unavailable_backend_raises_before_parameters_are_repointed(monkeypatch) -> None:
    import bbfused.backends as backends

    model = torch.nn.Linear(3, 2)
    data_ptr = model.weight.data_ptr()
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: "not here (test)")
    with pytest.raises(backends.BackendUnavailableError, match="not here"):
        BB(model.parameters(), lr=0.1, steps_per_epoch=3, backend="triton")
    assert model.weight.data_ptr() == data_ptr and model.weight.grad is None


def test_group_params_forms() -> None:
    single = torch.nn.Parameter(torch.ones(2, 3))
    opt = BB([{"params": single}], lr=0.1, steps_per_epoch=3, backend="eager")
    assert opt.param_groups[0]["params"] == [single]
    with pytest.raises(TypeError, match="not a set"):
        BB({torch.nn.Parameter(torch.ones(2))}, lr=0.1, steps_per_epoch=3, backend="eager")
    with pytest.raises(TypeError, match="not a set"):
        BB([{"params": {torch.nn.Parameter(torch.ones(2))}}], lr=0.1, steps_per_epoch=3, backend="eager")


def test_lr_scheduler_scales_the_rate() -> None:
    """A scheduler's writes to the groups' lr scale BB's rate: the value written is the rate applied from the next
    step on, and the groups, get_last_lr() and lr show it; BB's own rate changes then carry the factor along."""
    model, opt = _model_and_opt()
    scheduler = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=3)
    assert scheduler.get_last_lr() == [pytest.approx(0.002)] * 2
    _train_steps(model, opt, 0, 1)
    assert opt.lr == pytest.approx(0.002) and [g["lr"] for g in opt.param_groups] == scheduler.get_last_lr()
    scheduler.step()  # factor 0.01 + 0.99 / 3
    _train_steps(model, opt, 1, 3)  # the epoch ends: BB's rule sets its next rate, the factor stays
    factor = 0.01 + 0.99 / 3
    assert opt.lr_history == [pytest.approx(0.2 * factor)]
    assert opt.lr == pytest.approx(factor * opt.state_dict()["bb"]["rule_lr"])
    assert opt.state_dict()["bb"]["lr_multiplier"] == pytest.approx(factor)
    assert [g["lr"] for g in opt.param_groups] == [opt.lr, opt.lr]
    # The first step ran at 0.002: exactly a run whose rate is 0.002 from the start.
    reference_model, reference = _model_and_opt()
    with torch.no_grad():
        reference.param_groups[0]["lr"] = reference.param_groups[1]["lr"] = 0.002
    _train_steps(reference_model, reference, 0, 1)
    fresh_model, fresh = _model_and_opt()
    torch.optim.lr_scheduler.LinearLR(fresh, start_factor=0.01, total_iters=3)
    _train_steps(fresh_model, fresh, 0, 1)
    for p, q in zip(fresh_model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0)


def test_one_cycle_runs_without_cycling_momentum() -> None:
    """The momentum is one constant of the optimizer, not a group setting: torch refuses OneCycleLR's default
    cycle_momentum=True (BB's defaults hold neither "momentum" nor "betas"), and with cycle_momentum=False every step
    applies the rate it wrote."""
    model, opt = _model_and_opt()
    with pytest.raises(ValueError, match="cycle_momentum"):
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=6)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=6, cycle_momentum=False)
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)  # no gradient: its steps move nothing
    sgd_scheduler = torch.optim.lr_scheduler.OneCycleLR(sgd, max_lr=0.5, total_steps=6, cycle_momentum=False)
    for step in range(6):  # an epoch end (4 steps) in between: the scheduler's next write still holds
        assert [g["lr"] for g in opt.param_groups] == [pytest.approx(opt.lr)] * 2
        assert opt.lr == pytest.approx(sgd.param_groups[0]["lr"], rel=1e-12)  # the rate torch's SGD would take
        _train_steps(model, opt, step, 1)
        if step < 5:
            scheduler.step()
            sgd.step()
            sgd_scheduler.step()


def test_lr_written_badly_is_refused_and_shown_again() -> None:
    model, opt = _model_and_opt()
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match=r"set to nan; BB takes a finite number >= 0"):
        _train_steps(model, opt, 0, 1)
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.2] and opt.lr == 0.2


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda bb: bb.update(steps_per_epoch=None), "saved with end_epoch"),
        (lambda bb: bb.update(beta=5.0), "beta must be in"),
        (lambda bb: bb.update(tau_min=200.0), "tau_min 200.0 > tau_max"),  # the default tau_max is 100
        (lambda bb: bb.update(epoch=-3), "epoch must be an int"),
        (lambda bb: bb.update(step_in_epoch=1.5), "step_in_epoch must be an int"),
        (lambda bb: bb.update(step_in_epoch=4), "not below steps_per_epoch"),
        (lambda bb: bb["lr_history"].append(0.5), "lr_history must list the 1 completed epochs"),
        (lambda bb: bb.pop("tau0"), "the 'bb' entry lacks tau0"),
    ],
)
def test_load_state_dict_validates_the_schedule_before_writing(corrupt, match) -> None:
    model, opt = _model_and_opt()
    _train_steps(model, opt, 0, 6)
    state = opt.state_dict()
    corrupt(state["bb"])
    fresh_model, fresh = _model_and_opt()
    ema_before = fresh.state[fresh_model[0].weight]["ema"].clone()
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(state)
    assert fresh.epoch == 0 and fresh.step_in_epoch == 0 and fresh.lr == 0.2
    assert torch.equal(fresh.state[fresh_model[0].weight]["ema"], ema_before)


def test_load_state_dict_rejects_complex_state() -> None:
    model, opt = _model_and_opt()
    state = opt.state_dict()
    state["state"][0]["ema"] = state["state"][0]["ema"].to(torch.complex64)
    with pytest.raises(ValueError, match="real floating-point tensor"):
        _model_and_opt()[1].load_state_dict(state)


def test_groups_show_the_rate_as_a_float_that_monitors_can_keep() -> None:
    model, opt = _model_and_opt()
    kept = [opt.param_groups[0]["lr"]]  # what a learning-rate monitor stores
    for start in range(0, 12, 4):
        _train_steps(model, opt, start, 4)
        kept.append(opt.param_groups[0]["lr"])
    assert all(type(lr) is float for lr in kept)
    assert kept == [0.2, *opt.lr_history[1:], opt.lr]  # each entry keeps its epoch's rate
