"""A refused load_state_dict changes nothing, and what it refuses: every value is checked before any is written
(types, shapes, dtypes, layouts, the history, the finiteness of every snapshot the default control could roll
back to). Also the clear error of zero_grad() after a model was converted."""

from __future__ import annotations

import copy

import pytest
import torch

from bbfused import BB, checkpoint

STEPS = 4


def _trained(safeguard: bool = True, steps: int = STEPS) -> tuple[torch.nn.Module, BB]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    # The paper's method with momentum, so that only the rate control differs from the default.
    momentum = {} if safeguard else {"momentum": 0.9}
    opt = BB(model.parameters(), lr=0.1, steps_per_epoch=steps, backend="eager", safeguard=safeguard, **momentum)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps + 2):
        x = torch.randn(16, 4, generator=generator)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss)
    return model, opt


def _fingerprint(model: torch.nn.Module, opt: BB) -> tuple:
    state = opt.state_dict()
    tensors = [t.clone() for entry in state["state"].values() for t in entry.values()]
    bb = {key: value for key, value in state["bb"].items() if key != "model_buffers"}
    groups = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
    return [p.detach().clone() for p in model.parameters()], tensors, bb, groups, opt.lr, opt.epoch


def _same(a: tuple, b: tuple) -> bool:
    (params_a, tensors_a, *rest_a), (params_b, tensors_b, *rest_b) = a, b
    same_tensors = all(torch.equal(x, y) for x, y in zip(params_a + tensors_a, params_b + tensors_b))
    return same_tensors and rest_a == rest_b


def _last(state: dict) -> dict:
    return state["state"][max(state["state"])]


CORRUPTIONS = {
    "lr_history of strings": (lambda s: s["bb"].update(lr_history=["0.1"]), "lr_history must hold finite rates"),
    "lr_history of None": (lambda s: s["bb"].update(lr_history=[None]), "lr_history must hold finite rates"),
    "lr_history entry a 2-element tensor": (
        lambda s: s["bb"].update(lr_history=[torch.tensor([0.1, 0.2])]),
        "lr_history must hold finite rates",
    ),
    "meta prev_ema on the last parameter": (
        lambda s: _last(s).update(prev_ema=torch.empty_like(_last(s)["prev_ema"], device="meta")),
        "'prev_ema' for parameter .* is a meta",
    ),
    "sparse prev_ema on the last parameter": (
        lambda s: _last(s).update(
            prev_ema=torch.zeros(2, 8).to_sparse() if _last(s)["prev_ema"].dim() == 2 else torch.zeros(2).to_sparse()
        ),
        "'prev_ema' for parameter .* is a sparse",
    ),
    "inf prev_params": (
        lambda s: _last(s)["prev_params"].fill_(float("inf")),
        "'prev_params' for parameter .* holds inf or NaN: the default rate control would roll the weights back",
    ),
    "NaN ema": (lambda s: _last(s)["ema"].fill_(float("nan")), "'ema' for parameter .* holds inf or NaN"),
    "momentum buffer missing": (lambda s: _last(s).pop("momentum_buffer"), "'momentum_buffer' for parameter"),
    "negative multiplier": (lambda s: s["bb"].update(lr_multiplier=-1.0), "lr_multiplier must be a finite number"),
    "rate not finite": (lambda s: s["bb"].update(rate=float("inf")), "rate must be a finite number > 0"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_refused_load_changes_nothing(name: str) -> None:
    corrupt, message = CORRUPTIONS[name]
    source_model, source = _trained()
    state = copy.deepcopy(source.state_dict())
    corrupt(state)
    model, opt = _trained()
    for _ in range(3):  # move it away from the saved state first
        opt.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
    before = _fingerprint(model, opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state)
    assert _same(_fingerprint(model, opt), before)


def test_the_paper_method_loads_its_own_non_finite_state() -> None:
    """safeguard=False never rolls back: a diverged paper run's state (NaN averages) saves and loads as it is."""
    source_model, source = _trained(safeguard=False)
    state = copy.deepcopy(source.state_dict())
    _last(state)["ema"].fill_(float("nan"))
    model, opt = _trained(safeguard=False)
    opt.load_state_dict(state)
    assert torch.isnan(opt.state_dict()["state"][max(state["state"])]["ema"]).all()


@pytest.mark.parametrize("convert", ["half", "double"])
def test_zero_grad_after_the_model_was_converted_names_the_fix(convert: str) -> None:
    model, opt = _trained()
    getattr(model, convert)()
    with pytest.raises(RuntimeError, match=r"was re-allocated after the BB optimizer was built .* model.to\(\)"):
        opt.zero_grad()


MISMATCHES = {
    "the paper's method into the default": (
        dict(safeguard=False),
        dict(),
        "saved with safeguard=False \\(the paper's method\\), this optimizer has safeguard=True; build it with "
        "safeguard=False",
    ),
    "the default into the paper's method": (
        dict(),
        dict(safeguard=False),
        "saved with safeguard=True \\(the default rate control\\), this optimizer has safeguard=False",
    ),
    "another epoch length": (
        dict(steps=STEPS),
        dict(steps=STEPS + 3),
        f"saved with epochs of {STEPS} steps, this optimizer has steps_per_epoch={STEPS + 3}; build it with "
        f"steps_per_epoch={STEPS}",
    ),
}


@pytest.mark.parametrize("name", sorted(MISMATCHES))
def test_a_run_of_another_rate_control_or_epoch_length_is_refused_before_any_write(name: str) -> None:
    """The rate control and the epoch's length shape every later step: a load across them is refused with the
    value to build the optimizer with, and changes nothing."""
    saved_with, built_with, message = MISMATCHES[name]
    _, source = _trained(**saved_with)
    state = copy.deepcopy(source.state_dict())
    model, opt = _trained(**built_with)
    before = _fingerprint(model, opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state)
    assert _same(_fingerprint(model, opt), before)


@pytest.mark.parametrize("safeguard", [True, False])
def test_a_version_6_checkpoint_names_its_rate_control_by_its_tau0(safeguard: bool) -> None:
    """Version 6 and earlier did not save the rate control; from version 4 on only the paper's method saved a τ₀,
    which tells them apart. Version 3 and earlier load into either."""
    _, source = _trained(safeguard)
    state = copy.deepcopy(source.state_dict())
    del state["bb"]["safeguard"]
    state["bb"]["version"] = 6
    model, other = _trained(not safeguard)
    with pytest.raises(ValueError, match=f"saved with safeguard={safeguard} "):
        other.load_state_dict(state)
    _, same = _trained(safeguard)
    same.load_state_dict(state)
    assert same.state_dict()["bb"]["safeguard"] is safeguard
    state["bb"]["version"] = 3
    assert checkpoint.read(state).safeguard is None
