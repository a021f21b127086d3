"""A refused load_state_dict changes nothing, and what it refuses: every value is checked before any is written
(types, shapes, dtypes, layouts, the history, the finiteness of every snapshot the default control could roll
back to). Also the clear error of zero_grad() after a model was converted."""

from __future__ import annotations

import copy

import pytest
import torch

from bbfused import BB

STEPS = 4


def _trained(safeguard: bool = True) -> tuple[torch.nn.Module, BB]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = BB(model.parameters(), lr=0.1, steps_per_epoch=STEPS, backend="eager", safeguard=safeguard)
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS + 2):
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
