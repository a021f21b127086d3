"""``BB(preconditioner="adam")`` as a user meets it: the step is Adam's, the state and checkpoints carry the second
moments, a group added later starts its own bias correction, and bad inputs are refused before anything changes."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bbfused import BB, checkpoint
from bbfused.control import PreconditionedControl, safeguard
from bbfused.preconditioner import BETA2, EPS

BACKENDS = ["eager", "cpp"]


def model_and_data(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return model, torch.randn(40, 6), torch.randint(0, 3, (40,))


def train(opt: BB, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    losses = []
    for step in range(steps):
        batch = slice(10 * (step % 4), 10 * (step % 4) + 10)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        opt.step(loss=loss)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_epoch_is_adam(backend: str) -> None:
    """Within the first rate period (a constant rate) and without momentum the step is torch's Adam with β₁ = 0 and
    L2 weight decay: d / (√(v / (1 − β₂ᵗ)) + ε), to float32 rounding (Adam takes √v / √(1 − β₂ᵗ))."""
    model, x, y = model_and_data()
    twin = copy.deepcopy(model)
    opt = BB(
        model.parameters(), lr=1e-3, steps_per_epoch=40, weight_decay=1e-2, momentum=0.0, backend=backend,
        preconditioner="adam",
    )  # fmt: skip
    adam = torch.optim.Adam(twin.parameters(), lr=1e-3, betas=(0.0, BETA2), eps=EPS, weight_decay=1e-2)
    train(opt, model, x, y, steps=8)
    for step in range(8):
        batch = slice(10 * (step % 4), 10 * (step % 4) + 10)
        adam.zero_grad()
        torch.nn.functional.cross_entropy(twin(x[batch]), y[batch]).backward()
        adam.step()
    for p, q, start in zip(model.parameters(), twin.parameters(), model_and_data()[0].parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], adam.state[q]["exp_avg_sq"], rtol=1e-5, atol=1e-12)
        assert float((p.detach() - start.detach()).abs().max()) > 4e-3  # eight steps of about lr each
    assert opt.lr == 1e-3


def test_first_rate_is_at_most_1e_3() -> None:
    """The run starts at min(lr, 1e-3), so every larger lr is the same run; the group shows the rate applied."""
    for lr, first in ((10.0, 1e-3), (0.1, 1e-3), (1e-4, 1e-4)):
        model, _, _ = model_and_data()
        opt = BB(model.parameters(), lr=lr, steps_per_epoch=4, backend="eager", preconditioner="adam")
        assert opt.lr == first and opt.param_groups[0]["lr"] == first
    assert PreconditionedControl.FIRST_RATE_LIMIT == 1e-3
    runs = []
    for lr in (10.0, 1e-3):
        model, x, y = model_and_data()
        opt = BB(model.parameters(), lr=lr, steps_per_epoch=4, epochs=3, backend="eager", preconditioner="adam")
        runs.append((train(opt, model, x, y, steps=12), opt.lr_history))
    assert runs[0] == runs[1]


def first_epoch_rates(
    backend: str, losses: list[float], after_progress_tolerance: float | None = None
) -> tuple[list[float], float]:
    """½‖θ‖² from lr = 1e-3 with 12 steps an epoch, each step given the next loss; the rate after every 3 steps (the
    first epoch's four periods, then every quarter epoch) and the ceiling at the end. ``after_progress_tolerance``:
    the first epoch's rise tolerance after progress, in place of the control's."""
    theta = torch.nn.Parameter(torch.ones(16))
    opt = BB([theta], lr=1e-3, steps_per_epoch=12, momentum=0.0, backend=backend, preconditioner="adam")
    if after_progress_tolerance is not None:
        opt._control.FIRST_EPOCH_RISE_AFTER_PROGRESS = after_progress_tolerance
    rates = []
    for step, loss in enumerate(losses):
        opt.zero_grad()
        (0.5 * theta.square().sum()).backward()
        opt.step(loss=loss)
        if step % 3 == 2:
            rates.append(opt.lr)
    return rates, opt.state_dict()["bb"]["ceiling"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_rise_in_the_first_epoch_after_progress_brakes(backend: str) -> None:
    """A first-epoch period whose mean loss rose 0.5 % (under the SGD control's 10 % tolerance) after the loss fell well
    below its start ends the search, halves the rate and caps it at 0.7 times the rate that rose for the rest of the
    run; the same run with the SGD control's tolerance goes on growing."""
    losses = [2.0, 1.0, 1.0] + [1.0] * 3 + [0.9] * 3 + [0.9045] * 3 + [0.9] * 24
    assert PreconditionedControl.FIRST_EPOCH_RISE_AFTER_PROGRESS == 0.0
    braked, ceiling = first_epoch_rates(backend, losses)
    grown, _ = first_epoch_rates(backend, losses, after_progress_tolerance=safeguard.FIRST_EPOCH_RISE)
    assert braked[:3] == grown[:3] == [1e-3, 2e-3, 4e-3]  # the search doubles while the loss falls
    assert braked[3] == pytest.approx(4e-3 * safeguard.LOSS_BRAKE)
    assert ceiling == pytest.approx(4e-3 * safeguard.CEILING)
    assert max(braked[3:]) <= ceiling and braked[-1] > braked[3]  # it grows again, under the ceiling
    assert grown[3] == pytest.approx(4e-3 * PreconditionedControl.RATE_GROWTH_LIMIT) and max(grown) > ceiling


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_small_rise_while_the_loss_is_on_its_start_is_noise(backend: str) -> None:
    """On a plateau at the first step's loss a 1 % rise of a period's mean does not brake (it takes the SGD control's
    10 %): the search goes on doubling, and no ceiling is set."""
    rates, ceiling = first_epoch_rates(backend, [2.0] * 3 + [2.02] * 3 + [2.0] * 6)
    assert rates == [1e-3, 2e-3, 4e-3, 8e-3] and ceiling == math.inf
    braked, ceiling = first_epoch_rates(backend, [2.0] * 3 + [2.24] * 3 + [2.0] * 6)  # a 12 % rise: not noise
    assert braked[1] == pytest.approx(1e-3 * safeguard.LOSS_BRAKE)
    assert ceiling == pytest.approx(1e-3 * safeguard.CEILING)


@pytest.mark.parametrize("backend", BACKENDS)
def test_progress_once_made_counts_for_the_rest_of_the_first_epoch(backend: str) -> None:
    """The first period's mean fell below 0.95 times the first step's loss; the second rose 1.4 %, back above that
    mark: still a rise after progress, so it brakes."""
    rates, ceiling = first_epoch_rates(backend, [2.0, 1.84, 1.84] + [1.92] * 3 + [1.9] * 6)
    assert rates[1] == pytest.approx(1e-3 * safeguard.LOSS_BRAKE)
    assert ceiling == pytest.approx(1e-3 * safeguard.CEILING)


def test_state_holds_second_moments() -> None:
    model, x, y = model_and_data()
    opt = BB(model.parameters(), lr=1e-3, steps_per_epoch=4, backend="eager", preconditioner="adam")
    train(opt, model, x, y, steps=3)
    for p in model.parameters():
        v = opt.state[p]["exp_avg_sq"]
        assert v.shape == p.shape and bool((v > 0).all())
    assert opt.state_dict()["bb"]["beta2_powers"] == [pytest.approx(BETA2**3, rel=1e-15)]
    plain = BB(model_and_data()[0].parameters(), lr=0.1, steps_per_epoch=4, backend="eager")
    assert all("exp_avg_sq" not in state for state in plain.state.values())
    assert plain.state_dict()["bb"]["preconditioner"] is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_gives_the_same_run(backend: str) -> None:
    """A run saved mid-epoch and resumed in a new optimizer goes on bit for bit as the uninterrupted one."""
    model, x, y = model_and_data()
    opt = BB(model.parameters(), lr=1e-3, steps_per_epoch=4, epochs=4, backend=backend, preconditioner="adam")
    train(opt, model, x, y, steps=6)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    rest = train(opt, model, x, y, steps=10)
    resumed_model = model_and_data(seed=1)[0]
    resumed_model.load_state_dict(saved_model)
    resumed = BB(
        resumed_model.parameters(), lr=1e-3, steps_per_epoch=4, epochs=4, backend=backend, preconditioner="adam"
    )
    resumed.load_state_dict(saved)
    assert train(resumed, resumed_model, x, y, steps=10) == rest
    assert resumed.lr_history == opt.lr_history
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["exp_avg_sq"], resumed.state[q]["exp_avg_sq"])


def test_load_refuses_another_step_kind() -> None:
    """A checkpoint of one step kind does not load into the other; nothing is written."""
    model, x, y = model_and_data()
    adam = BB(model.parameters(), lr=1e-3, steps_per_epoch=4, backend="eager", preconditioner="adam")
    train(adam, model, x, y, steps=5)
    other_model = model_and_data(seed=2)[0]
    sgd = BB(other_model.parameters(), lr=0.1, steps_per_epoch=4, backend="eager")
    train(sgd, other_model, x, y, steps=5)
    before = [p.detach().clone() for p in other_model.parameters()]
    with pytest.raises(ValueError, match="preconditioner='adam'"):
        sgd.load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match="preconditioner=None"):
        adam.load_state_dict(sgd.state_dict())
    assert all(torch.equal(p, b) for p, b in zip(other_model.parameters(), before))
    assert sgd.epoch == 1 and sgd.step_in_epoch == 1


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd["bb"].update(beta2_powers=[]), "beta2_powers must list 1"),
        (lambda sd: sd["bb"].update(beta2_powers=[1.5]), "beta2_powers must list 1 numbers in"),
        (lambda sd: sd["bb"].update(preconditioner="lamb"), "preconditioner must be one of"),
        (lambda sd: sd["bb"].update(beta2_lags=[[0]]), r"beta2_lags must list, .* \[4\] of them"),
        (lambda sd: sd["bb"].update(beta2_lags=[[0, -1, 0, 0]]), "beta2_lags must list"),
        (lambda sd: sd["state"][0]["exp_avg_sq"].fill_(-1.0), "holds negative, inf or NaN values"),
        (lambda sd: sd["state"][0]["exp_avg_sq"].fill_(float("inf")), "holds negative, inf or NaN values"),
        (lambda sd: sd["state"][0].pop("exp_avg_sq"), "'exp_avg_sq' for parameter .* is missing"),
    ],
)
def test_corrupt_checkpoints_are_refused(edit, message: str) -> None:
    model, x, y = model_and_data()
    opt = BB(model.parameters(), lr=1e-3, steps_per_epoch=4, backend="eager", preconditioner="adam")
    train(opt, model, x, y, steps=5)
    state_dict = copy.deepcopy(opt.state_dict())
    edit(state_dict)
    before = [p.detach().clone() for p in model.parameters()]
    second_moments = [opt.state[p]["exp_avg_sq"].clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state_dict)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.equal(opt.state[p]["exp_avg_sq"], v) for p, v in zip(model.parameters(), second_moments))


def test_a_group_added_later_loads_only_into_an_optimizer_grown_alike() -> None:
    """A checkpoint whose second group was added after 3 steps counts that group's steps apart: an optimizer built
    with both groups at once cannot hold that and says how to build one that can; one grown alike resumes it."""
    model, x, y = model_and_data()
    model[2].requires_grad_(False)
    opt = BB(model[0].parameters(), lr=1e-3, steps_per_epoch=4, backend="eager", preconditioner="adam")
    train(opt, model, x, y, steps=3)
    model[2].requires_grad_(True)
    opt.add_param_group({"params": model[2].parameters(), "weight_decay": 1e-3})
    train(opt, model, x, y, steps=2)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["bb"]["beta2_powers"] == pytest.approx([BETA2**5, BETA2**2], rel=1e-15)
    other_model = model_and_data(seed=3)[0]
    groups = [{"params": other_model[0].parameters()}, {"params": other_model[2].parameters(), "weight_decay": 1e-3}]
    at_once = BB(groups, lr=1e-3, steps_per_epoch=4, backend="eager", preconditioner="adam")
    before = [p.detach().clone() for p in other_model.parameters()]
    with pytest.raises(ValueError, match=r"param_groups\[1\] took other steps .* add the others with add_param_group"):
        at_once.load_state_dict(saved)
    assert all(torch.equal(p, b) for p, b in zip(other_model.parameters(), before))
    grown = BB(other_model[0].parameters(), lr=1e-3, steps_per_epoch=4, backend="eager", preconditioner="adam")
    grown.add_param_group({"params": other_model[2].parameters(), "weight_decay": 1e-3})
    grown.load_state_dict(saved)
    assert grown.state_dict()["bb"]["beta2_powers"] == saved["bb"]["beta2_powers"]


def test_added_group_counts_its_own_steps() -> None:
    """A group added after 5 steps takes Adam's first step: without momentum each weight moves by lr·d/(|d| + ε),
    about lr, not the ~30x larger step a zero second moment under the old groups' correction would give."""
    model, x, y = model_and_data()
    model[2].requires_grad_(False)
    opt = BB(model[0].parameters(), lr=1e-3, steps_per_epoch=40, momentum=0.0, backend="eager", preconditioner="adam")
    train(opt, model, x, y, steps=5)
    model[2].requires_grad_(True)
    opt.add_param_group({"params": model[2].parameters()})
    before = model[2].weight.detach().clone()
    train(opt, model, x, y, steps=1)
    moved = (model[2].weight.detach() - before).abs()
    torch.testing.assert_close(moved, torch.full_like(moved, 1e-3), rtol=1e-3, atol=0)
    assert opt.state_dict()["bb"]["beta2_powers"] == pytest.approx([BETA2**6, BETA2**1], rel=1e-15)


def test_bad_arguments_name_the_fix() -> None:
    params = list(model_and_data()[0].parameters())
    with pytest.raises(ValueError, match="preconditioner must be None .* or 'adam'"):
        BB(params, lr=0.1, steps_per_epoch=4, preconditioner="sgd")
    with pytest.raises(ValueError, match="needs the default rate control"):
        BB(params, lr=0.1, steps_per_epoch=4, safeguard=False, preconditioner="adam")
    assert all(p.grad is None for p in params)  # refused before any parameter was packed


def test_skipped_nonfinite_gradient_keeps_the_second_moment() -> None:
    model, x, y = model_and_data()
    opt = BB(model.parameters(), lr=1e-3, steps_per_epoch=4, backend="eager", preconditioner="adam")
    train(opt, model, x, y, steps=2)
    weight = model[0].weight
    v_before = opt.state[weight]["exp_avg_sq"].clone()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x[:10]), y[:10]).backward()
    weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.skipped_gradient_values == 1
    assert opt.state[weight]["exp_avg_sq"][0, 0] == v_before[0, 0]
    assert torch.isfinite(weight).all() and bool((opt.state[weight]["exp_avg_sq"] != v_before).any())


def test_version_3_checkpoint_resumes_as_sgd() -> None:
    """A state dict saved before the preconditioner existed (format version 3) is an SGD run's, and resumes as one."""
    model, x, y = model_and_data()
    opt = BB(model.parameters(), lr=0.1, steps_per_epoch=4, epochs=4, backend="eager")
    train(opt, model, x, y, steps=6)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    rest = train(opt, model, x, y, steps=6)
    for bb in [saved["bb"], *(group["bb"] for group in saved["param_groups"])]:
        for key in ("preconditioner", "beta2_powers", "beta2_lags"):
            bb.pop(key, None)
        bb["version"] = 3
    resumed_model = model_and_data(seed=1)[0]
    resumed_model.load_state_dict(saved_model)
    resumed = BB(resumed_model.parameters(), lr=0.1, steps_per_epoch=4, epochs=4, backend="eager")
    resumed.load_state_dict(saved)
    assert train(resumed, resumed_model, x, y, steps=6) == rest
    assert resumed.state_dict()["bb"]["version"] == checkpoint.VERSION
    adam = BB(model_and_data()[0].parameters(), lr=0.1, steps_per_epoch=4, backend="eager", preconditioner="adam")
    with pytest.raises(ValueError, match="saved with preconditioner=None"):
        adam.load_state_dict(saved)


@pytest.mark.parametrize("backend", BACKENDS)
def test_copies_go_on_as_the_original(backend: str) -> None:
    """deepcopy and pickle of (model, optimizer) mid-run carry the second moments and each group's count."""
    import pickle

    model, x, y = model_and_data()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "weight_decay": 1e-3}]
    opt = BB(groups, lr=1e-3, steps_per_epoch=4, epochs=4, backend=backend, preconditioner="adam")
    train(opt, model, x, y, steps=6)
    copies = [copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    losses = train(opt, model, x, y, steps=8)
    for copied_model, copied in copies:
        assert train(copied, copied_model, x, y, steps=8) == losses
        assert copied.lr_history == opt.lr_history
        assert copied.state_dict()["bb"]["beta2_powers"] == opt.state_dict()["bb"]["beta2_powers"]
        for p, q in zip(model.parameters(), copied_model.parameters()):
            assert torch.equal(opt.state[p]["exp_avg_sq"], copied.state[q]["exp_avg_sq"])


def test_a_step_gradscaler_skips_does_not_count() -> None:
    """With GradScaler's found_inf set the step writes nothing and β₂ᵗ stays, as torch's fused Adam's step count."""
    model, x, y = model_and_data()
    opt = BB(model.parameters(), lr=1e-3, steps_per_epoch=8, backend="eager", preconditioner="adam")
    train(opt, model, x, y, steps=2)
    before = [p.detach().clone() for p in model.parameters()]
    second_moments = [opt.state[p]["exp_avg_sq"].clone() for p in model.parameters()]
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x[:10]), y[:10]).backward()
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)  # as GradScaler sets them around step()
    opt.step()
    del opt.grad_scale, opt.found_inf
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.equal(opt.state[p]["exp_avg_sq"], v) for p, v in zip(model.parameters(), second_moments))
    assert opt.state_dict()["bb"]["beta2_powers"] == [pytest.approx(BETA2**2, rel=1e-15)]
    train(opt, model, x, y, steps=1)
    assert opt.state_dict()["bb"]["beta2_powers"] == [pytest.approx(BETA2**3, rel=1e-15)]


def test_a_parameter_unfrozen_within_its_group_takes_adams_first_step() -> None:
    """A parameter that gets its first gradient after its group's fifth step counts its own steps, as torch's Adam
    does: without momentum its first step moves each weight by about lr (d / |d|), and its lag (the group's steps
    it missed) survives a checkpoint, so a resumed run steps it alike."""
    model, x, y = model_and_data()
    model[2].weight.requires_grad_(False)
    opt = BB(model.parameters(), lr=1e-3, steps_per_epoch=40, momentum=0.0, backend="eager", preconditioner="adam")
    train(opt, model, x, y, steps=5)
    model[2].weight.requires_grad_(True)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved["bb"]["beta2_lags"] == [[0, 0, 5, 0]]
    before = model[2].weight.detach().clone()
    losses = [train(opt, model, x, y, steps=1), train(opt, model, x, y, steps=2)]
    assert opt.state_dict()["bb"]["beta2_lags"] == [[0, 0, 5, 0]]
    first = model_and_data(seed=1)[0]
    first.load_state_dict(saved_model)
    resumed = BB(first.parameters(), lr=1e-3, steps_per_epoch=40, momentum=0.0, backend="eager", preconditioner="adam")
    resumed.load_state_dict(saved)
    assert train(resumed, first, x, y, steps=1) == losses[0]
    moved = (first[2].weight.detach() - before).abs()
    torch.testing.assert_close(moved, torch.full_like(moved, 1e-3), rtol=1e-3, atol=0)
    assert train(resumed, first, x, y, steps=2) == losses[1]
