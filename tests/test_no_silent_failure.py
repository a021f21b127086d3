"""Misuse that must not fail silently: copies, hooks, tensor hyper-parameters, warnings that point at the
caller, gradients and parameters swapped behind the buffers' back, aliased parameters, an interrupted epoch end and
ranks that disagree on the epoch length."""

from __future__ import annotations

import copy
import io
import os
import pickle
import signal
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from bbfused import BB, GradientReplacedWarning

STEPS = 4


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _optimizer(model: torch.nn.Module, safeguard: bool = True, backend: str = "eager") -> BB:
    decay = [p for name, p in model.named_parameters() if name.endswith("weight")]
    rest = [p for name, p in model.named_parameters() if not name.endswith("weight")]
    groups = [{"params": decay, "weight_decay": 1e-3}, {"params": rest, "weight_decay": 0.0}]
    opt = BB(groups, lr=0.3, steps_per_epoch=STEPS, backend=backend, safeguard=safeguard)
    opt.track_buffers(model)
    return opt


def _train(model: torch.nn.Module, opt: BB, start: int, count: int) -> None:
    """``count`` steps on batches that depend on the global step only, each giving BB its loss."""
    for step in range(start, start + count):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(16, 6, generator=generator)
        y = torch.randint(0, 3, (16,), generator=generator)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss)


def _same_run(model_a, opt_a: BB, model_b, opt_b: BB) -> None:
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    for a, b in zip(model_a.buffers(), model_b.buffers()):
        assert torch.equal(a, b)
    assert opt_a.lr_history == opt_b.lr_history and opt_a.lr == opt_b.lr
    assert (opt_a.epoch, opt_a.step_in_epoch) == (opt_b.epoch, opt_b.step_in_epoch)
    assert opt_a.rolled_back_epochs == opt_b.rolled_back_epochs
    bb_a, bb_b = opt_a.state_dict()["bb"], opt_b.state_dict()["bb"]
    buffers_a, buffers_b = bb_a.pop("model_buffers"), bb_b.pop("model_buffers")
    assert bb_a == bb_b and len(buffers_a) == len(buffers_b)
    assert all(torch.equal(a, b) for a, b in zip(buffers_a, buffers_b))


# --------------------------------------------------------------------------------------- copies
def _pickled(obj):
    return pickle.loads(pickle.dumps(obj))


def _torch_saved(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("safeguard", [True, False], ids=["safeguard", "paper"])
@pytest.mark.parametrize("make_copy", [copy.deepcopy, _pickled, _torch_saved], ids=["deepcopy", "pickle", "torch"])
def test_copy_of_model_and_optimizer_continues_exactly(make_copy, safeguard: bool) -> None:
    model = _model()
    opt = _optimizer(model, safeguard)
    _train(model, opt, 0, 6)  # mid-epoch 1, after an epoch end
    twin_model, twin = make_copy((model, opt))

    # The copy drives the copied model: its parameters and gradients are views of the copy's own buffers.
    weights = [twin_model[0].weight, twin_model[1].weight, twin_model[3].weight]
    assert [id(p) for p in twin.param_groups[0]["params"]] == [id(p) for p in weights]
    for buffer, original in zip(twin._buffers, opt._buffers):
        assert buffer.param.data_ptr() != original.param.data_ptr()
        for p, offset in zip(buffer.params, buffer.offsets):
            assert p.data_ptr() == buffer.param.data_ptr() + offset * p.element_size()
            assert p.grad.data_ptr() == buffer.grad.data_ptr() + offset * p.element_size()
            assert twin.state[p]["ema"].data_ptr() == buffer.ema.data_ptr() + offset * buffer.ema.element_size()
    if safeguard:
        assert [id(b) for b in twin._control.model_buffers.live] == [id(b) for b in twin_model.buffers()]
    _same_run(model, opt, twin_model, twin)

    # Both go on alike through two epoch ends (steps 8 and 12); the original does not move with the copy.
    before = [p.detach().clone() for p in model.parameters()]
    _train(twin_model, twin, 6, 1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    _train(model, opt, 6, 1)
    _train(model, opt, 7, 7)
    _train(twin_model, twin, 7, 7)
    assert opt.epoch == 3 and len(opt.lr_history) == 3
    _same_run(model, opt, twin_model, twin)


@pytest.mark.parametrize(
    "make_copy", [copy.deepcopy, lambda obj: pickle.loads(pickle.dumps(obj))], ids=["deepcopy", "pickle"]
)
def test_copy_keeps_state_entries_that_are_not_parameters(make_copy) -> None:
    """What a state-dict hook keeps in opt.state under its own key survives a copy, as with torch.optim."""
    model = _model()
    opt = _optimizer(model)
    opt.state["ema_decay"] = {"value": 0.999}
    _, copied = make_copy((model, opt))
    assert copied.state["ema_decay"] == {"value": 0.999}
    assert len(copied.state) == len(opt.state) and copied.state_dict()["state"]["ema_decay"] == {"value": 0.999}


def test_copy_keeps_which_gradients_count_and_drops_hooks() -> None:
    model = torch.nn.Linear(3, 2)
    opt = BB(model.parameters(), lr=0.5, steps_per_epoch=10, momentum=0.0, backend="eager")  # a plain SGD step
    opt.register_step_pre_hook(lambda *args: None)
    opt.zero_grad()
    model.weight.grad.fill_(1.0)  # an in-place write counts, the bias has no gradient
    twin_model, twin = copy.deepcopy((model, opt))
    assert not twin._optimizer_step_pre_hooks
    bias = twin_model.bias.detach().clone()
    twin.step()
    torch.testing.assert_close(twin_model.weight, model.weight.detach() - 0.5)
    assert torch.equal(twin_model.bias, bias)
    # backward into the copy marks the copy's gradients (its own hooks), not the original's
    opt.zero_grad()
    twin.zero_grad()
    twin_model(torch.ones(1, 3)).sum().backward()
    assert twin._buffers[0].written == [True, True] and opt._buffers[0].written == [False, False]


# ------------------------------------------------------------------------------------------- hooks
def test_state_dict_and_load_state_dict_call_their_hooks() -> None:
    model = _model()
    opt = _optimizer(model)
    _train(model, opt, 0, 5)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("save-pre", o.step_in_epoch)))

    def save_post(o, state_dict):
        calls.append(("save-post", "bb" in state_dict, state_dict["param_groups"][0]["lr"] == o.lr))
        return {**state_dict, "note": "added by a hook"}

    opt.register_state_dict_post_hook(save_post)
    saved = opt.state_dict()
    assert saved["note"] == "added by a hook"
    assert calls == [("save-pre", 1), ("save-post", True, True)]

    fresh_model = _model()
    fresh = _optimizer(fresh_model)
    other = copy.deepcopy(saved)
    other["bb"]["step_in_epoch"] = 2

    def load_pre(o, state_dict):
        calls.append(("load-pre", state_dict["note"], o.epoch))
        state_dict["note"] = "edited"  # the caller's dict is a shallow copy: left alone
        return other  # a replacement dict is what gets loaded

    fresh.register_load_state_dict_pre_hook(load_pre)
    fresh.register_load_state_dict_post_hook(lambda o: calls.append(("load-post", o.epoch, o.step_in_epoch)))
    fresh.load_state_dict(saved)
    assert saved["note"] == "added by a hook"
    assert calls[2:] == [("load-pre", "added by a hook", 0), ("load-post", 1, 2)]


def test_step_hooks_are_called() -> None:
    model = _model()
    opt = _optimizer(model)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o.step_in_epoch)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o.step_in_epoch)))
    _train(model, opt, 0, 1)
    assert calls == [("pre", 0), ("post", 1)]


# ----------------------------------------------------------------------- tensor and NumPy numbers
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=torch.tensor(0.25)),
        dict(lr=torch.tensor([0.25], dtype=torch.float64)),
        dict(lr=np.float64(0.25), steps_per_epoch=np.int64(STEPS)),
        dict(lr=np.float32(0.25), weight_decay=np.float32(0.5)),
        dict(weight_decay=torch.tensor(0.5), beta=torch.tensor(0.5, dtype=torch.float64)),
        dict(tau_min=np.float64(0.1), tau_max=torch.tensor([10.0])),
        dict(safeguard=False, tau0=torch.tensor(1), tau_min=np.float64(0.1), tau_max=torch.tensor([10.0])),
        dict(steps_per_epoch=torch.tensor(STEPS)),
        dict(momentum=torch.tensor(0.9, dtype=torch.float64)),  # the default mode's own momentum, as a tensor
    ],
    ids=[
        "tensor",
        "one-element",
        "numpy",
        "numpy-float32",
        "tensor-decay-beta",
        "taus",
        "paper-taus",
        "tensor-steps",
        "tensor-momentum",
    ],
)
def test_tensor_and_numpy_hyperparameters_equal_floats(kwargs) -> None:
    plain = dict(lr=0.25, steps_per_epoch=STEPS, weight_decay=0.5, beta=0.5, tau_min=0.1, tau_max=10.0)
    taus = ("tau_min", "tau_max")
    if kwargs.get("safeguard") is False:  # tau0 is the paper mode's fallback rate; the default mode has none
        plain |= dict(safeguard=False, tau0=1.0)
        taus = ("tau0", *taus)
    runs = []
    for arguments in (plain, plain | kwargs):
        p = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 5))
        opt = BB([p], backend="eager", **arguments)
        for _ in range(3 * STEPS):
            opt.zero_grad()
            (p**2).sum().backward()
            opt.step()
        runs.append((p.detach().clone(), opt.lr_history, opt.state_dict()))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert runs[0][2]["bb"] == runs[1][2]["bb"]
    assert type(runs[1][2]["param_groups"][0]["weight_decay"]) is float
    assert all(type(runs[1][2]["bb"][key]) is float for key in ("beta", "momentum", *taus))
    assert type(runs[1][2]["bb"]["steps_per_epoch"]) is int


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=torch.tensor([0.1, 0.2])), r"lr must be a number, got a torch.float32 tensor of shape \(2,\); pass a"),
        (dict(lr=torch.tensor(0.1 + 0j)), r"lr must be a number, got a torch.complex64 tensor .* pass a real"),
        (dict(lr=torch.tensor(True)), r"lr must be a number, got a torch.bool tensor"),
        (dict(lr=torch.tensor(float("nan"))), r"lr must be a finite number > 0, got tensor\(nan\)"),
        (dict(lr=np.complex128(0.1)), r"lr must be a number, got .*\(complex\); pass a float"),
        (dict(lr=np.bool_(True)), r"lr must be a number, got .*\(a bool\)"),
        (dict(lr="0.1"), r"lr must be a number, got '0.1' \(of type str\)"),
        (dict(weight_decay=torch.ones(3)), r"weight_decay must be a number, got a torch.float32 tensor of shape"),
        (dict(beta=np.float64(2.0)), r"beta must be in \(0, 1\]"),
        (dict(tau_max=torch.tensor(-1.0)), r"tau_max must be a finite number > 0"),
        (dict(steps_per_epoch=np.float64(4.0)), r"steps_per_epoch must be an int, got .*pass a Python int"),
        (dict(steps_per_epoch=torch.tensor(4.0)), r"steps_per_epoch must be an int, got a torch.float32 tensor"),
    ],
)
def test_bad_tensor_and_numpy_hyperparameters_name_the_fix(kwargs, match) -> None:
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=match):
        BB([p], **(dict(lr=0.1, steps_per_epoch=STEPS, backend="eager") | kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr="0.1"),
        dict(lr=None),
        dict(steps_per_epoch="5"),
        dict(momentum="0.9"),
        dict(weight_decay=None),
        dict(lr=np.bool_(True)),
        dict(tau_max=0.5j),
    ],
)
def test_a_wrong_kind_of_object_is_a_type_error_that_value_error_also_catches(kwargs) -> None:
    """A string, None, a bool or a complex number for a number argument is a TypeError, as torch.optim raises for
    one; ``except ValueError``, which catches every other argument error, catches it too."""
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(TypeError, match=f"{next(iter(kwargs))} must be a"):
        BB([p], **(dict(lr=0.1, steps_per_epoch=STEPS, backend="eager") | kwargs))
    with pytest.raises(ValueError):
        BB([p], **(dict(lr=0.1, steps_per_epoch=STEPS, backend="eager") | kwargs))


def test_group_weight_decay_tensor_is_taken_as_a_float() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = BB([{"params": [p], "weight_decay": torch.tensor(0.5)}], lr=0.1, steps_per_epoch=STEPS, backend="eager")
    assert opt.param_groups[0]["weight_decay"] == 0.5 and type(opt.param_groups[0]["weight_decay"]) is float
    with pytest.raises(ValueError, match=r"weight_decay of param_groups\[0\] must be a number, got .*shape \(2,\)"):
        BB([{"params": [p], "weight_decay": torch.ones(2)}], lr=0.1, steps_per_epoch=STEPS, backend="eager")


def test_numpy_loss_is_watched() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = BB([p], lr=0.1, steps_per_epoch=STEPS, backend="eager")
    opt.zero_grad()
    opt.step(loss=np.float32(2.0))
    assert opt.state_dict()["bb"]["initial_loss"] == 2.0


# ------------------------------------------------------------------------------------ warnings
def _caught(action):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return caught


def test_every_warning_points_at_the_callers_line() -> None:
    model = torch.nn.Linear(3, 2)
    caught = _caught(
        lambda: BB(
            [{"params": [model.weight], "lr": 0.5}, {"params": [model.bias]}],
            lr=0.1,
            steps_per_epoch=3,
            backend="eager",
        )
    )
    opt = BB([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.1, steps_per_epoch=3, backend="eager")
    opt.param_groups[1]["lr"] = 0.5  # one group's rate: BB warns at the next step that it has one
    model.zero_grad(set_to_none=True)
    model(torch.ones(1, 3)).sum().backward()  # a gradient that replaced BB's view
    caught += _caught(lambda: opt.step())
    # Through torch.amp.GradScaler.step as well: the user's line is the scaler call.
    scaler_opt = BB(model.parameters(), lr=0.1, steps_per_epoch=3, backend="eager")
    scaler = torch.amp.GradScaler("cpu")
    model.zero_grad(set_to_none=True)
    scaler.scale(model(torch.ones(1, 3)).sum()).backward()
    caught += _caught(lambda: scaler.step(scaler_opt))
    messages = [str(w.message)[:60] for w in caught]
    assert len(caught) == 4, messages
    assert {w.category for w in caught} == {UserWarning, GradientReplacedWarning}
    assert [w.filename for w in caught] == [__file__] * 4, [(w.filename, w.lineno) for w in caught]


def test_backend_fallback_warning_points_at_the_constructor(monkeypatch) -> None:
    import bbfused.backends as backends

    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: "no compiler (test)")
    caught = _caught(lambda: BB([torch.nn.Parameter(torch.ones(2))], lr=0.1, steps_per_epoch=3))
    assert [(w.category, w.filename) for w in caught] == [(RuntimeWarning, __file__)]


# ------------------------------------------------------------------- swapped gradients and data
def test_gradient_data_swapped_is_adopted_with_a_warning() -> None:
    model = torch.nn.Linear(3, 2)
    # Plain SGD steps; T = 16: no period end (whose weight-growth test would roll these steps back) after step 2.
    opt = BB(model.parameters(), lr=0.5, steps_per_epoch=16, momentum=0.0, backend="eager")
    (buffer,) = opt._buffers
    weight = model.weight.detach().clone()
    opt.zero_grad()
    model.weight.grad.data = torch.full((2, 3), 2.0)  # keeps the .grad object, moves it off the buffer
    with pytest.warns(GradientReplacedWarning, match=r"p\.grad\.data"):
        opt.step()
    torch.testing.assert_close(model.weight.detach(), weight - 0.5 * 2.0)
    assert model.weight.grad.data_ptr() == buffer.grad.data_ptr()
    # Not frozen: backward accumulates into the buffer again, the next step uses it.
    opt.zero_grad()
    model(torch.ones(1, 3)).sum().backward()
    weight = model.weight.detach().clone()
    opt.step()
    torch.testing.assert_close(model.weight.detach(), weight - 0.5)
    # zero_grad() also points a swapped gradient back at the buffer.
    model.weight.grad.data = torch.full((2, 3), 7.0)
    opt.zero_grad()
    assert model.weight.grad.data_ptr() == buffer.grad.data_ptr() and not model.weight.grad.any()
    model.weight.grad.data = torch.ones(3, 2)
    with pytest.raises(RuntimeError, match=r"gradient of shape \(3, 2\).*of the parameter's shape"):
        opt.step()


def test_parameter_data_swapped_raises_naming_the_fix() -> None:
    model = torch.nn.Linear(3, 2)
    opt = BB(model.named_parameters(), lr=0.1, steps_per_epoch=3, backend="eager")
    model.weight.data = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match=r"'weight' was re-allocated.*p\.copy_\(values\)"):
        opt.step()
    assert opt.step_in_epoch == 0


# ---------------------------------------------------------------------------- aliased parameters
@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: [torch.nn.Parameter(torch.zeros(3).expand(4, 3))],
            r"param_groups\[0\]\['params'\]\[0\] \(shape \(4, 3\), strides \(0, 1\)\) has elements that share memory",
        ),
        (
            lambda: [torch.nn.Parameter(torch.zeros(1, 3).expand(2, 3).t())],
            r"strides \(1, 0\)\) has elements that share memory",
        ),
        (lambda: _viewed(lambda base: base[1]), r"\[0\] and .*\[1\] share memory .*one Parameter object"),
        (lambda: _viewed(lambda base: base.t()), r"share memory"),
        (lambda: _viewed(lambda base: base.flatten()[5:]), r"share memory"),
        (lambda: _numpy_aliases(), r"\[0\] and .*\[1\] share memory"),
    ],
    ids=["expanded", "expanded-transposed", "row-view", "transposed-view", "overlapping-slice", "two-storages"],
)
def test_parameters_that_share_memory_raise_before_writing(make, match) -> None:
    params = make()
    pointers = [p.data_ptr() for p in params]
    with pytest.raises(ValueError, match=match):
        BB(params, lr=0.1, steps_per_epoch=3, backend="eager")
    assert [p.data_ptr() for p in params] == pointers and all(p.grad is None for p in params)


def _numpy_aliases():
    """Two parameters on different storages over the same memory (two tensors made from one NumPy array)."""
    values = np.arange(6, dtype=np.float32)
    return [torch.nn.Parameter(torch.from_numpy(values)), torch.nn.Parameter(torch.from_numpy(values[2:]))]


def _viewed(view):
    base = torch.nn.Parameter(torch.arange(12.0).reshape(4, 3))
    return [base, torch.nn.Parameter(view(base.detach()))]


def test_parameters_on_one_storage_without_overlap_are_packed() -> None:
    """Disjoint views of one storage (a model loaded from a checkpoint of BB's views; interleaved slices) are not
    aliases: they pack fine. So does a second optimizer built over the first one's views."""
    base = torch.arange(24.0)
    params = [
        torch.nn.Parameter(base[:6].view(2, 3)),
        torch.nn.Parameter(base[6:12:2]),
        torch.nn.Parameter(base[7:12:2]),
        torch.nn.Parameter(base[12:].view(3, 4).t()),
    ]
    values = [p.detach().clone() for p in params]
    BB(params, lr=0.1, steps_per_epoch=3, backend="eager")
    again = BB(params, lr=0.1, steps_per_epoch=3, backend="eager")
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    assert params[0].data_ptr() == again._buffers[0].param.data_ptr()


# --------------------------------------------------------------------------- interrupted epoch end
class _InterruptOnce:
    """Wraps a method: the ``call``-th call raises KeyboardInterrupt, before or after doing its work."""

    def __init__(self, method, call: int, after: bool) -> None:
        self.method, self.call, self.after, self.calls = method, call, after, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.call and not self.after:
            raise KeyboardInterrupt
        result = self.method(*args, **kwargs)
        if self.calls == self.call and self.after:
            raise KeyboardInterrupt
        return result


def _two_buffer_run(safeguard: bool):
    model = _model().double()  # the BatchNorm network in float64 and a float32 head: two buffers per group
    model[3].float()
    decay = [model[0].weight, model[1].weight, model[3].weight]
    rest = [model[0].bias, model[1].bias, model[3].bias]
    groups = [{"params": decay, "weight_decay": 1e-3}, {"params": rest}]
    opt = BB(groups, lr=0.3, steps_per_epoch=STEPS, backend="eager", safeguard=safeguard)
    opt.track_buffers(model)
    return model, opt


def _train_mixed(model, opt, start: int, count: int) -> None:
    for step in range(start, start + count):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(16, 6, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 3, (16,), generator=generator)
        opt.zero_grad()
        hidden = model[2](model[1](model[0](x)))
        loss = torch.nn.functional.cross_entropy(model[3](hidden.float()), y)
        loss.backward()
        opt.step(loss=loss)


@pytest.mark.parametrize(
    "pass_name, call, after",
    [
        ("epoch_measure", 1, False),
        ("epoch_measure", 3, False),  # two of the four buffers have run their pass
        ("epoch_commit", 2, False),
        ("epoch_commit", 4, True),  # every buffer committed, the model buffers not yet
        ("epoch_end", 2, False),
    ],
)
@pytest.mark.parametrize("resume", ["step", "state_dict"])
def test_interrupted_epoch_end_is_finished_exactly(monkeypatch, pass_name: str, call: int, after: bool, resume) -> None:
    safeguard = pass_name != "epoch_end"
    reference_model, reference = _two_buffer_run(safeguard)
    _train_mixed(reference_model, reference, 0, 3 * STEPS + 1)

    model, opt = _two_buffer_run(safeguard)
    assert len(opt._buffers) == 4
    _train_mixed(model, opt, 0, STEPS + 1)  # epoch 1 is the first with a BB estimate
    backend = opt._buffers.backends[torch.device("cpu")]
    interrupt = _InterruptOnce(getattr(backend, pass_name), call, after)
    monkeypatch.setattr(backend, pass_name, interrupt)
    with pytest.raises(KeyboardInterrupt):
        _train_mixed(model, opt, STEPS + 1, STEPS - 1)
    assert (opt.epoch, opt.step_in_epoch) == (1, STEPS)
    if resume == "state_dict":
        saved = opt.state_dict()  # finishes the epoch end: a loadable checkpoint
        assert (saved["bb"]["epoch"], saved["bb"]["step_in_epoch"]) == (2, 0)
        fresh_model, fresh = _two_buffer_run(safeguard)
        fresh_model.load_state_dict(model.state_dict())
        fresh.load_state_dict(saved)
        model, opt = fresh_model, fresh
    _train_mixed(model, opt, 2 * STEPS, STEPS + 1)
    assert interrupt.calls >= call
    _same_run(reference_model, reference, model, opt)


def _reference_and_run_into_epoch_two():
    """An uninterrupted reference two epochs and a step long, and a fresh run one step into epoch 1 (0-based)."""
    reference_model = _model()
    reference = _optimizer(reference_model)
    _train(reference_model, reference, 0, 2 * STEPS + 1)
    model = _model()
    opt = _optimizer(model)
    _train(model, opt, 0, STEPS + 1)
    return reference_model, reference, model, opt


def test_interrupted_rate_control_closes_the_epoch_at_the_next_step(monkeypatch) -> None:
    reference_model, reference, model, opt = _reference_and_run_into_epoch_two()
    monkeypatch.setattr(opt._control, "close_epoch", _InterruptOnce(opt._control.close_epoch, 1, False))
    with pytest.raises(KeyboardInterrupt):
        _train(model, opt, STEPS + 1, STEPS - 1)
    _train(model, opt, 2 * STEPS, 1)
    _same_run(reference_model, reference, model, opt)


def test_ctrl_c_during_the_epoch_end_waits_for_it(monkeypatch) -> None:
    reference_model, reference, model, opt = _reference_and_run_into_epoch_two()
    backend = opt._buffers.backends[torch.device("cpu")]
    measure = backend.epoch_measure

    sent = []

    def measure_and_ctrl_c(*args):
        if not sent:  # one Ctrl-C (a second one passes through: the user insists)
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode: still inside the epoch end
        return measure(*args)

    monkeypatch.setattr(backend, "epoch_measure", measure_and_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _train(model, opt, STEPS + 1, STEPS - 1)
    assert (opt.epoch, opt.step_in_epoch) == (2, 0)  # the epoch closed before the interrupt was delivered
    monkeypatch.setattr(backend, "epoch_measure", measure)
    _train(model, opt, 2 * STEPS, 1)
    _same_run(reference_model, reference, model, opt)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --------------------------------------------------------------------------------- distributed
def _ranks_with_steps(rank: int, world: int, init_file: str, results: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        p = torch.nn.Parameter(torch.ones(3))
        same = BB([p], lr=0.1, steps_per_epoch=4, backend="eager")
        same.zero_grad()
        same.step()  # equal steps_per_epoch: no error
        different = BB([p], lr=0.1, steps_per_epoch=4 + rank, backend="eager")
        try:
            different.step()
            message = "no error"
        except RuntimeError as error:
            message = str(error)
        with open(os.path.join(results, f"rank{rank}.txt"), "w") as file:
            file.write(message)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_with_different_steps_per_epoch_raise_on_every_rank(tmp_path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_ranks_with_steps, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "steps_per_epoch differs between the ranks" in message, message
        assert "(4 on rank 0; 5 on rank 1)" in message and "DistributedSampler" in message


def _ranks_adding_groups(rank: int, world: int, init_file: str, results: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        p = torch.nn.Parameter(torch.ones(3))
        opt = BB([p], lr=0.1, steps_per_epoch=4, backend="eager")
        opt.zero_grad()
        opt.step()
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})  # the same group on both ranks
        opt.step()
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2 + rank))]})  # not the same
        try:
            opt.step()
            message = "no error"
        except RuntimeError as error:
            message = str(error)
        with open(os.path.join(results, f"rank{rank}.txt"), "w") as file:
            file.write(f"{opt.step_in_epoch} {message}")
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_that_add_different_groups_raise_on_every_rank(tmp_path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_ranks_adding_groups, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert message.startswith("2 bbfused.BB: the parameter groups differ between the ranks"), message
        assert "(3 groups of 7 elements in all on rank 0; 3 groups of 8 elements in all on rank 1)" in message


def test_interrupted_epoch_end_is_finished_by_the_next_step_alone(monkeypatch) -> None:
    """A loop without zero_grad() (gradients written in place): the next step() closes the epoch first."""

    def run(interrupt: bool):
        p = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 7))
        opt = BB([p], lr=0.2, steps_per_epoch=STEPS, backend="eager")
        for step in range(3 * STEPS):
            if interrupt and step == 2 * STEPS - 1:
                monkeypatch.setattr(opt._control, "close_epoch", _InterruptOnce(opt._control.close_epoch, 1, False))
            with torch.no_grad():
                p.grad.copy_(p * (1 + step % 3))
            try:
                opt.step(loss=1.0 / (1 + step))
            except KeyboardInterrupt:
                assert interrupt and (opt.epoch, opt.step_in_epoch) == (1, STEPS)
                interrupted_at.append(step)
        return p.detach(), opt.lr_history, opt.state_dict()["bb"]

    interrupted_at: list[int] = []

    interrupted, uninterrupted = run(True), run(False)
    assert interrupted_at == [2 * STEPS - 1] and len(uninterrupted[1]) == 3
    assert torch.equal(interrupted[0], uninterrupted[0]) and interrupted[1:] == uninterrupted[1:]


def test_second_ctrl_c_passes_through_and_a_held_one_is_not_lost() -> None:
    from bbfused.interrupts import deferred_sigint

    reached = []
    with pytest.raises(KeyboardInterrupt) as raised:
        with deferred_sigint():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # the second one is delivered at once
            reached.append(True)
    assert not reached and raised.value.__cause__ is None
    with pytest.raises(KeyboardInterrupt) as raised:
        with deferred_sigint():
            os.kill(os.getpid(), signal.SIGINT)
            raise RuntimeError("the held work failed")
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _saved(obj) -> bytes:
    stream = io.BytesIO()
    torch.save(obj, stream)
    return stream.getvalue()


def _wide_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 300), torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(300, 10))
    model[1].to(memory_format=torch.channels_last)
    return model


def test_each_parameter_owns_a_storage_of_exactly_its_bytes() -> None:
    """Saving a sub-module saves its own values only, as it would without BB (not the whole flat buffer)."""
    model = _wide_model()
    reference = copy.deepcopy(model)
    _optimizer(model)
    for p in model.parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
    assert model[1].weight.is_contiguous(memory_format=torch.channels_last)
    for module, plain in ((model[2], reference[2]), (model[1], reference[1]), (model, reference)):
        assert len(_saved(module.state_dict())) <= len(_saved(plain.state_dict())) + 512
    loaded = torch.load(io.BytesIO(_saved(model[2].state_dict())), weights_only=True)
    assert set(loaded) == {"weight", "bias"} and torch.equal(loaded["weight"], model[2].weight.detach())


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_parameters_and_gradients_still_drive_the_buffers(backend: str) -> None:
    """The per-parameter storages are the flat buffers' memory: a step through the buffers moves the parameters,
    and backward writes into the flat gradient buffer. Same trajectory as an optimizer over a copy of the model."""
    model, twin = _model(), _model()
    opt, twin_opt = _optimizer(model, backend=backend), _optimizer(twin, backend="eager")
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 0, STEPS + 2)
    _train(twin, twin_opt, 0, STEPS + 2)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    buffer = opt._buffers[0]
    assert torch.equal(buffer.view(buffer.param, 0), buffer.params[0].detach())
    assert torch.equal(buffer.view(buffer.grad, 0), buffer.params[0].grad)


def test_safetensors_save_and_load_model_round_trip(tmp_path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = _wide_model()
    opt = _optimizer(model)
    _train_wide(model, opt)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_model(model, str(path))
    fresh = _wide_model()
    safetensors_torch.load_model(fresh, str(path))
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    sub = tmp_path / "head.safetensors"
    safetensors_torch.save_model(model[2], str(sub))
    assert sub.stat().st_size < 2 * 300 * 10 * 4
    # Loading into the model BB drives writes through to the optimizer's buffer (copied in place).
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    safetensors_torch.load_model(model, str(path))
    buffer = opt._buffers[0]
    assert torch.equal(buffer.view(buffer.param, 0), fresh[0].weight.detach())


def _train_wide(model: torch.nn.Module, opt: BB) -> None:
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        opt.zero_grad()
        loss = model[2](model[0](x)).square().mean()
        loss.backward()
        opt.step(loss=loss)
