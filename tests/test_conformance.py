"""torch.optim's Optimizer contract, walked for ``bbfused.BB`` the way torch's ``test/test_optim.py`` walks its own
optimizers (``TestOptimRenewed``'s generic tests), on torch's ``OptimizerInfo`` machinery.

``BB_INFO`` describes BB to that machinery: the constructor inputs (``optim_inputs_func``), the inputs that must
raise (``optim_error_inputs_func``, torch's generic ones included), what BB does not support (complex and sparse,
the foreach/fused/differentiable flags: it has backends instead) and, as ``skips``, the generic tests of
``test_optim.py`` that meet a deviation BB keeps on purpose. The tests below run the contract over BB's inputs
crossed with the CPU backends (eager and cpp; the Triton kernels need a GPU or their slow interpreter, see
``test_triton_backend.py``), as torch crosses its inputs with foreach and fused, and compare values: trajectories,
state dicts and parameters, against a second BB or against ``torch.optim.SGD`` (until its first rate period
ends BB is SGD with L2 weight decay and, by default, momentum in EMA form). Every deviation is a test named
``test_deviation_*`` that asserts the documented behaviour. ``add_param_group`` is left out on purpose: its
behaviour is being changed elsewhere.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import pickle
import unittest
import warnings

import numpy as np
import pytest
import torch

from bbfused import BB, GradientReplacedWarning
from bbfused.backends import unavailable_reason
from bbfused.control import PaperControl, SafeguardControl


def _import_torch_testing():
    """Import torch's optimizer test machinery, undoing what its import changes for the whole process.

    ``torch.testing._internal.common_utils`` freezes the ``torch.backends`` flags (a later
    ``torch.backends.cudnn.benchmark = True``, as ``bbfused.train`` sets on CUDA, would raise) and loads a Hypothesis
    profile of 10 examples (every Hypothesis test of the suite would run fewer). It is private API: anything
    missing skips this module with the reason."""
    frozen = torch.backends.flags_frozen()
    try:
        import hypothesis
    except ImportError:
        hypothesis = None
    profile = hypothesis.settings.default if hypothesis is not None else None
    try:
        from torch.testing._internal import common_optimizers
        from torch.testing._internal.common_methods_invocations import DecorateInfo
    except ImportError as error:  # expecttest missing (a test dependency of torch), or a torch without these
        pytest.skip(f"torch.testing._internal cannot be imported here: {error}", allow_module_level=True)
    finally:
        if not frozen and torch.backends.flags_frozen():
            # the module global that torch.backends.disable_global_flags() cleared
            torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
        if profile is not None and hypothesis.settings.default is not profile:
            hypothesis.settings.register_profile("bbfused-before-torch-testing", profile)
            hypothesis.settings.load_profile("bbfused-before-torch-testing")
    names = ("OptimizerInfo", "OptimizerInput", "ErrorOptimizerInput", "OptimizerErrorEnum")
    missing = [name for name in names if not hasattr(common_optimizers, name)]
    if missing:
        pytest.skip(f"this torch's common_optimizers lacks {', '.join(missing)}", allow_module_level=True)
    return common_optimizers, DecorateInfo


common_optimizers, DecorateInfo = _import_torch_testing()
OptimizerInfo = common_optimizers.OptimizerInfo
OptimizerInput = common_optimizers.OptimizerInput
ErrorOptimizerInput = common_optimizers.ErrorOptimizerInput
OptimizerErrorEnum = common_optimizers.OptimizerErrorEnum

CPU = torch.device("cpu")
STEPS = 4  # steps per epoch: every trajectory below crosses epoch ends
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------ the OptimizerInfo
def optim_inputs_func_bb(device, dtype=None):
    """BB's constructor inputs, without params (the tests build them) and without a backend (crossed in below, as
    torch crosses its inputs with foreach/fused). Every input closes epochs: steps_per_epoch, or end_epoch()."""
    epoch = {"steps_per_epoch": STEPS}
    return [
        OptimizerInput(params=None, kwargs={**epoch}, desc="default"),
        OptimizerInput(params=None, kwargs={**epoch, "lr": 0.05}, desc="non-default lr"),
        OptimizerInput(params=None, kwargs={**epoch, "lr": torch.tensor(0.05)}, desc="tensor lr"),
        OptimizerInput(params=None, kwargs={**epoch, "lr": np.float64(0.05)}, desc="numpy lr"),
        OptimizerInput(params=None, kwargs={**epoch, "weight_decay": 0.1}, desc="non-zero weight_decay"),
        OptimizerInput(params=None, kwargs={**epoch, "safeguard": False, "weight_decay": 0.1}, desc="paper method"),
        OptimizerInput(
            params=None,
            kwargs={**epoch, "safeguard": False, "beta": 0.5, "tau0": 0.5, "tau_min": 1 / 3, "tau_max": 3.0},
            desc="paper method with beta and taus",
        ),
        OptimizerInput(params=None, kwargs={**epoch, "tau_min": 0.01, "tau_max": 3.0}, desc="rate bounds"),
        OptimizerInput(params=None, kwargs={**epoch, "momentum": 0.0, "epochs": 3}, desc="no momentum, planned"),
        OptimizerInput(params=None, kwargs={"steps_per_epoch": None, "beta": 0.5}, desc="end_epoch"),
    ]


# torch's generic error inputs (get_error_inputs_for_all_optims), by description: BB's message for each, and the
# one where BB raises instead of warning (see test_deviation_duplicate_parameter_in_a_group_is_an_error).
_GENERIC_ERROR_MESSAGES = {
    "invalid param type": r"params must be an iterable of tensors or of dicts, not a tensor",
    "a param group cannot have duplicate parameters": r"params'\]\[1\] \(shape \(1, 1\)\) is listed twice",
    "duplicate parameters should not occur across param groups either": r"is listed twice",
    "Tensor lr must be 1-element": r"lr must be a number, got a torch.float32 tensor of shape \(2,\)",
}
_GENERIC_ERROR_TYPES = {"a param group cannot have duplicate parameters": ValueError}


def optim_error_inputs_func_bb(device, dtype):
    """torch's errors for every optimizer (BB's messages where they differ), then BB's own."""
    error_inputs = []
    generic = getattr(common_optimizers, "get_error_inputs_for_all_optims", lambda device, dtype: [])
    for error_input in generic(device, dtype):
        optim_input = error_input.optimizer_error_input
        desc = optim_input.desc
        error_inputs.append(
            ErrorOptimizerInput(
                OptimizerInput(optim_input.params, {"steps_per_epoch": STEPS, **optim_input.kwargs}, desc),
                error_on=error_input.error_on,
                error_type=_GENERIC_ERROR_TYPES.get(desc, error_input.error_type),
                error_regex=_GENERIC_ERROR_MESSAGES.get(desc, error_input.error_regex),
            )
        )
    param = torch.nn.Parameter(torch.randn(2, 3, device=device, dtype=dtype))
    sparse_grad = torch.nn.Parameter(torch.randn(3, device=device, dtype=dtype))
    sparse_grad.grad = torch.ones(3, device=device, dtype=dtype).to_sparse()

    def bad(kwargs, desc, error_type, regex, params=None):
        # torch passes params=None for hyper-parameter errors: they must raise before the parameters are looked at
        kwargs = {"steps_per_epoch": STEPS, **kwargs}
        return ErrorOptimizerInput(OptimizerInput(params, kwargs, desc), error_type=error_type, error_regex=regex)

    return error_inputs + [
        bad({"lr": 0.0}, "lr must be positive", ValueError, r"lr must be a finite number > 0, got 0.0"),
        bad({"lr": float("inf")}, "lr must be finite", ValueError, r"lr must be a finite number > 0, got inf"),
        bad({"lr": torch.tensor(0.1j)}, "complex tensor lr", ValueError, r"lr must be a number, got a torch.complex64"),
        bad({"steps_per_epoch": 0}, "steps_per_epoch must be positive", ValueError, r"steps_per_epoch must be a pos"),
        bad({"steps_per_epoch": None}, "beta is required without steps_per_epoch", ValueError, r"beta is required"),
        bad({"beta": 1.5}, "beta in (0, 1]", ValueError, r"beta must be in \(0, 1\], got 1.5"),
        bad({"weight_decay": -0.1}, "weight_decay >= 0", ValueError, r"weight_decay must be a finite number >= 0"),
        bad({"tau_min": 2.0, "tau_max": 1.0}, "tau_min <= tau_max", ValueError, r"tau_min \(2.0\) must be <= tau_max"),
        bad({"safeguard": 1}, "safeguard is a bool", TypeError, r"safeguard must be True or False, got 1"),
        bad({"backend": "fused"}, "unknown backend", ValueError, r"unknown backend 'fused'; choose one of auto"),
        bad({}, "integer params", TypeError, r"BB optimizes real floating-point parameters", [torch.ones(3).long()]),
        bad({}, "sparse gradient", TypeError, r"has a sparse gradient; BB needs dense gradients", [sparse_grad]),
        bad({}, "empty params", ValueError, r"BB got an empty parameter list", []),
        bad(
            {}, "empty group", ValueError, r"param_groups\[1\] has no parameters", [{"params": [param]}, {"params": []}]
        ),
        bad(
            {},
            "group weight_decay",
            ValueError,
            r"weight_decay of param_groups\[0\] must be a finite number >= 0",
            [{"params": [param], "weight_decay": -1.0}],
        ),
        bad({}, "params as a set", TypeError, r"parameters must be ordered: pass a list", {param}),
    ]


def _not_applicable(test_name: str, reason: str):
    return DecorateInfo(unittest.skip(reason), "TestOptimRenewed", test_name)


BB_INFO = OptimizerInfo(
    BB,
    optim_inputs_func=optim_inputs_func_bb,
    optim_error_inputs_func=optim_error_inputs_func_bb,
    # No foreach/fused/differentiable flags: the backend argument chooses the kernels (crossed in by _bb_inputs).
    supported_impls=(),
    not_og_supported_flags=(),
    supports_sparse=False,
    supports_complex=False,
    step_requires_closure=False,
    supports_param_groups=True,
    # For whoever runs torch's own test_optim.py (TestOptimRenewed) with this info: its generic tests that cannot
    # pass as written (a deviation BB keeps, or a setup BB does not take), each naming the test here instead.
    skips=(
        _not_applicable("test_param_groups_lr", "one global rate: test_deviation_per_group_lr_*"),
        _not_applicable("test_load_state_dict_pre_hook_and_prepend", "test_deviation_loaded_group_lr_*"),
        _not_applicable("test_load_state_dict_pre_post_hook", "test_deviation_loaded_group_lr_*"),
        _not_applicable("test_complex", "test_deviation_complex_params_refused"),
        _not_applicable("test_complex_2d", "test_deviation_complex_params_refused"),
        _not_applicable(
            "test_param_group_with_lrscheduler_goes_right_direction",
            "builds BB without steps_per_epoch (an error); a scheduler's writes: test_deviation_global_lr_*",
        ),
        _not_applicable(
            "test_forloop_goes_right_direction",
            "eta0 = 0.1 and the paper's fallback tau0/(k+2) exceed the stable rate of its problem (curvature up to "
            "about 30); test_goes_right_direction here runs it with curvature below 6",
        ),
    ),
)


# ----------------------------------------------------------------------------------------------- helpers
def _backends():
    for name in ("eager", "cpp"):
        reason = unavailable_reason(name, CPU)
        marks = () if reason is None else pytest.mark.skip(reason=f"the {name} backend cannot run here: {reason}")
        yield name, marks


def _bb_inputs():
    """(backend, OptimizerInput) for every CPU backend and every input of BB_INFO."""
    return [
        pytest.param(backend, optim_input, id=f"{backend}-{optim_input.desc.replace(' ', '_')}", marks=marks)
        for backend, marks in _backends()
        for optim_input in BB_INFO.optim_inputs_func(device="cpu")
    ]


def _backend_params():
    return [pytest.param(backend, id=backend, marks=marks) for backend, marks in _backends()]


BACKENDS = _backend_params()
INPUTS = _bb_inputs()


def _kwargs(backend: str, optim_input, **overrides):
    """A fresh copy of the input's kwargs (a tensor lr must not be shared between optimizers), with the backend."""
    return {**copy.deepcopy(optim_input.kwargs), "backend": backend, **overrides}


def _step(opt: BB, closure=None, **kwargs):
    """One step; with ``steps_per_epoch=None`` the caller ends the epoch every STEPS steps, as BB documents."""
    result = opt.step(closure, **kwargs)
    if opt.steps_per_epoch is None and opt.step_in_epoch == STEPS:
        opt.end_epoch()
    return result


def _linear(dtype=torch.float32, seed: int = 0):
    """test_optim.py's problem: a weight, a bias and ``(weight.mv(x) + bias).pow(2).sum()``."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(4, 3, generator=generator, dtype=torch.float64).to(dtype))
    bias = torch.nn.Parameter(torch.randn(4, generator=generator, dtype=torch.float64).to(dtype))
    return weight, bias


def _twin(weight, bias):
    with torch.no_grad():
        return torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())


def _closure(opt, weight, bias, step: int):
    """The loss of step ``step`` (inputs that depend on the step only), zero_grad and backward, as in test_optim.py."""

    def closure():
        opt.zero_grad()
        x = torch.randn(3, generator=torch.Generator().manual_seed(step), dtype=torch.float64).to(weight.dtype)
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss

    return closure


def _grouped(weight, bias, named: bool = False):
    """Two groups, as test_param_groups_weight_decay builds them: the bias without weight decay."""
    if named:
        return [{"params": [("weight", weight)]}, {"params": [("bias", bias)], "weight_decay": 0.0}]
    return [{"params": [weight]}, {"params": [bias], "weight_decay": 0.0}]


def _assert_same(a, b, where: str = "state_dict") -> None:
    """Nested dicts, lists, tensors and numbers equal exactly (tensors: same dtype, shape and values)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {a.keys()} != {b.keys()}"
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for index, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{index}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, f"{where}: {a!r} != {b!r}"
        assert torch.equal(a, b), f"{where}: {a} != {b}"
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def _assert_same_params(params_a, params_b) -> None:
    assert len(params_a) == len(params_b)
    for p, q in zip(params_a, params_b):
        assert torch.isfinite(p).all(), p
        assert torch.equal(p, q), (p, q)


@contextlib.contextmanager
def _recorded_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "error_input",
    [pytest.param(e, id=e.optimizer_error_input.desc) for e in BB_INFO.optim_error_inputs_func("cpu", torch.float32)],
)
def test_errors(error_input) -> None:
    """test_optim.py's test_errors over BB's error inputs: the error type torch raises (but one deviation), with
    BB's message; nothing is re-pointed at a buffer before the error."""
    optim_input = error_input.optimizer_error_input
    assert error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR
    tensors = [p for p in _tensors_of(optim_input.params)]
    pointers = [p.data_ptr() for p in tensors]
    grads = [p.grad for p in tensors]
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            BB(optim_input.params, **optim_input.kwargs)
    else:
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            BB(optim_input.params, **optim_input.kwargs)
    assert [p.data_ptr() for p in tensors] == pointers
    assert all(p.grad is g for p, g in zip(tensors, grads))


def _tensors_of(params):
    if params is None:
        return []
    if isinstance(params, torch.Tensor):
        return [params]
    found = []
    for entry in params:
        if isinstance(entry, dict):
            found += _tensors_of(entry["params"])
        elif isinstance(entry, tuple):
            found.append(entry[1])
        else:
            found.append(entry)
    return found


# ----------------------------------------------------------------------------------- state dict round trip
def _round_trip(backend: str, kwargs: dict, dtype: torch.dtype, named: tuple[bool, bool] = (False, False)):
    """test_state_dict_deterministic: prime an optimizer, load its state dict into a fresh one over cloned
    parameters, run both side by side across epoch ends: identical parameters and rates at every step, the state
    dict left unmodified by loading, equal state dicts at the end."""
    weight, bias = _linear(dtype)
    opt = BB(_grouped(weight, bias, named[0]), **copy.deepcopy(kwargs), backend=backend)
    for step in range(6):  # into epoch 1, after an epoch end
        _step(opt, _closure(opt, weight, bias, step))
    weight_c, bias_c = _twin(weight, bias)
    opt_c = BB(_grouped(weight_c, bias_c, named[1]), **copy.deepcopy(kwargs), backend=backend)
    state_dict = opt.state_dict()
    saved = copy.deepcopy(state_dict)
    opt_c.load_state_dict(state_dict)
    _assert_same(state_dict, saved)  # loading does not modify the dict
    assert (opt_c.epoch, opt_c.step_in_epoch, opt_c.lr) == (opt.epoch, opt.step_in_epoch, opt.lr)
    for step in range(6, 16):  # epoch ends after steps 8, 12 and 16
        loss = _step(opt, _closure(opt, weight, bias, step))
        loss_c = _step(opt_c, _closure(opt_c, weight_c, bias_c, step))
        assert torch.equal(loss, loss_c)
        _assert_same_params([weight, bias], [weight_c, bias_c])
        assert opt.lr == opt_c.lr
    assert opt.epoch == 4 and len(set(opt.lr_history)) > 1  # the rule has set rates of its own
    return opt, opt_c


def _without_names(state_dict):
    state_dict = copy.copy(state_dict)
    state_dict["param_groups"] = [
        {k: v for k, v in g.items() if k != "param_names"} for g in state_dict["param_groups"]
    ]
    return state_dict


@pytest.mark.parametrize("backend, optim_input", INPUTS)
def test_state_dict_round_trip_continues_identically(backend, optim_input) -> None:
    opt, opt_c = _round_trip(backend, optim_input.kwargs, torch.float32)
    _assert_same(opt.state_dict(), opt_c.state_dict())
    # torch's check of repeated parameters (pytorch#36831) extends param_groups with its own groups: BB adds groups
    # appended to param_groups (as add_param_group), and a parameter may be in one group only.
    opt_c.param_groups.extend(opt_c.param_groups)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt_c.state_dict()
    assert len(opt_c.param_groups) == len(opt.param_groups)
    _assert_same(opt.state_dict(), opt_c.state_dict())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_every_dtype(backend, dtype) -> None:
    opt, opt_c = _round_trip(backend, {"steps_per_epoch": STEPS, "weight_decay": 0.01}, dtype)
    state_dict = opt_c.state_dict()
    _assert_same(opt.state_dict(), state_dict)
    ema_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert [state_dict["state"][0][key].dtype for key in ("ema", "prev_params", "prev_ema")] == [
        ema_dtype,
        dtype,
        ema_dtype,
    ]


@pytest.mark.parametrize("named", [(True, True), (True, False), (False, True)], ids=["both", "saved", "loading"])
def test_state_dict_param_names_as_torch_optim(named) -> None:
    """test_can_load_from_to_named_state_dict: names given to either optimizer survive the round trip."""
    opt, opt_c = _round_trip("eager", {"steps_per_epoch": STEPS}, torch.float32, named)
    assert [g["param_names"] for g in opt_c.state_dict()["param_groups"]] == [["weight"], ["bias"]]
    _assert_same(_without_names(opt.state_dict()), _without_names(opt_c.state_dict()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_saves_and_loads_with_weights_only(backend) -> None:
    """test_save_load_equality_with_weights_only: torch.save, then torch.load(weights_only=True) gives the same
    dict, and loading it resumes mid-epoch bit-identically."""
    weight, bias = _linear()
    opt = BB(_grouped(weight, bias), lr=0.1, steps_per_epoch=STEPS, weight_decay=0.01, backend=backend)
    for step in range(7):
        _step(opt, _closure(opt, weight, bias, step))
    state_dict = opt.state_dict()
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    _assert_same(state_dict, loaded)
    weight_c, bias_c = _twin(weight, bias)
    opt_c = BB(_grouped(weight_c, bias_c), lr=0.1, steps_per_epoch=STEPS, weight_decay=0.01, backend=backend)
    opt_c.load_state_dict(loaded)
    for step in range(7, 12):
        _step(opt, _closure(opt, weight, bias, step))
        _step(opt_c, _closure(opt_c, weight_c, bias_c, step))
    _assert_same_params([weight, bias], [weight_c, bias_c])
    _assert_same(opt.state_dict(), opt_c.state_dict())


# ------------------------------------------------------------------------------------- state dict hooks
def _state_dict_pre_hook(optimizer) -> None:
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    state_dict["ran_state_dict_pre_hook"] = "test" in state_dict["state"]
    state_dict["state"].pop("test", None)
    return state_dict


@pytest.mark.parametrize("hooks", ["pre", "post", "pre-post"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_pre_and_post_hooks(backend, hooks) -> None:
    """test_state_dict_pre_hook, _post_hook and _pre_post_hook: a pre hook's entry in ``opt.state`` reaches the
    dict, as in torch.optim, and a post hook sees the whole dict (with BB's entry) and edits it."""
    weight, bias = _linear()
    opt = BB([weight, bias], lr=0.1, steps_per_epoch=STEPS, backend=backend)
    _step(opt, _closure(opt, weight, bias, 0))
    if "pre" in hooks:
        opt.register_state_dict_pre_hook(_state_dict_pre_hook)
    if "post" in hooks:
        opt.register_state_dict_post_hook(_state_dict_post_hook)
    state_dict = opt.state_dict()
    assert state_dict["bb"]["step_in_epoch"] == 1
    if hooks == "pre":
        assert state_dict["state"]["test"] == 1
        assert sorted(state_dict["state"], key=str) == [0, 1, "test"]
    else:
        assert state_dict["ran_state_dict_pre_hook"] is (hooks == "pre-post")
        assert sorted(state_dict["state"]) == [0, 1]


def _load_pre_hook_1(optimizer, state_dict) -> None:
    state_dict["bb"]["lr"] = 0.002


def _load_pre_hook_2(optimizer, state_dict):
    replacement = copy.deepcopy(state_dict)
    replacement["bb"]["lr"] = 0.003
    return replacement


def _load_post_hook(optimizer) -> None:
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.lr == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_pre_hooks_in_order_and_prepend(backend) -> None:
    """test_load_state_dict_pre_hook_and_prepend, on BB's rate (the "bb" entry: see the deviation below): a pre hook
    edits the dict in place, a prepended one returns a replacement that the later hooks then see."""
    weight, bias = _linear()
    # momentum=0.0: the step below is checked against a plain SGD step by the loaded rate
    opt = BB([weight, bias], lr=0.1, steps_per_epoch=STEPS, momentum=0.0, backend=backend)
    state_dict = opt.state_dict()
    opt.register_load_state_dict_pre_hook(_load_pre_hook_1)
    opt.load_state_dict(state_dict)
    assert opt.lr == 0.002 and opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(_load_pre_hook_2, prepend=True)
    opt.load_state_dict(state_dict)
    assert opt.lr == 0.002  # hook 2 ran first; hook 1 edited its replacement
    opt.register_load_state_dict_pre_hook(_load_pre_hook_2)
    opt.load_state_dict(state_dict)
    assert opt.lr == 0.003  # appended: its replacement is what gets loaded
    before = weight.detach().clone()
    _step(opt, _closure(opt, weight, bias, 0))
    expected = before - 0.003 * weight.grad
    torch.testing.assert_close(weight.detach(), expected)  # the loaded rate is the one the step uses


@pytest.mark.parametrize("with_pre_hook", [False, True], ids=["post", "pre-post"])
def test_load_state_dict_post_hook(with_pre_hook) -> None:
    """test_load_state_dict_post_hook and _pre_post_hook: the post hook runs after loading, on the loaded state."""
    weight, bias = _linear()
    opt = BB([weight, bias], lr=0.1, steps_per_epoch=STEPS, backend="eager")
    if with_pre_hook:
        opt.register_load_state_dict_pre_hook(_load_pre_hook_2)
    opt.register_load_state_dict_post_hook(_load_post_hook)
    opt.load_state_dict(opt.state_dict())
    assert opt.state["ran_load_state_dict_pre_hook2"] is with_pre_hook
    assert opt.state["ran_load_state_dict_post_hook"] is True


# -------------------------------------------------------------------------------------------- step hooks
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_hooks_instance_and_global_in_order(backend) -> None:
    """test_step_pre_hook, _post_hook and _all_hooks: global pre, instance pre, instance post, global post; another
    optimizer's instance hooks stay with it; removed hooks no longer run."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    calls = []
    params = [torch.tensor([1.0, 1.0])]
    opt = BB(params, lr=0.1, steps_per_epoch=STEPS, backend=backend)
    sgd = torch.optim.SGD([torch.tensor([1.0, 1.0])], lr=0.1)
    handles = [
        register_optimizer_step_pre_hook(lambda o, args, kwargs: calls.append(("global-pre", type(o).__name__))),
        register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append(("global-post", type(o).__name__))),
    ]
    try:
        for o in (opt, sgd):
            handles.append(o.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", type(o).__name__))))
            handles.append(o.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", type(o).__name__))))
        opt.step()
        sgd.step()
        opt.step()
    finally:
        for handle in handles:
            handle.remove()
    opt.step()
    sgd.step()
    one = [("global-pre", "BB"), ("pre", "BB"), ("post", "BB"), ("global-post", "BB")]
    assert calls == one + [(kind, "SGD") for kind, _ in one] + one
    assert opt.step_in_epoch == 3


def test_step_hooks_see_and_replace_the_arguments() -> None:
    """A step pre hook gets the step's arguments (the optimizer first, as torch.optim passes them) and may return
    replacements: BB then watches the replaced loss; the post hook sees the step taken."""
    weight, bias = _linear()
    opt = BB([weight, bias], lr=0.1, steps_per_epoch=STEPS, backend="eager")
    seen = []

    def pre_hook(o, args, kwargs):
        seen.append(("pre", args, dict(kwargs), o.step_in_epoch))
        return args, {"loss": torch.tensor(5.0)}

    opt.register_step_pre_hook(pre_hook)
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", args, dict(kwargs), o.step_in_epoch)))
    _closure(opt, weight, bias, 0)()
    opt.step(loss=torch.tensor(2.0))
    assert [(kind, args, step) for kind, args, _, step in seen] == [("pre", (opt,), 0), ("post", (opt,), 1)]
    assert float(seen[0][2]["loss"]) == 2.0 and float(seen[1][2]["loss"]) == 5.0
    assert opt.state_dict()["bb"]["initial_loss"] == 5.0


# ---------------------------------------------------------------------------------------------- closures
@pytest.mark.parametrize("backend", BACKENDS)
def test_closure_called_once_with_grad_enabled_and_its_value_returned(backend) -> None:
    """step(closure) calls the closure once, with gradients enabled even under no_grad, returns what it returns
    (a tensor or anything else), and applies the gradient the closure computed."""
    weight, bias = _linear()
    # momentum=0.0: the applied gradient is checked against a plain SGD step
    opt = BB([weight, bias], lr=0.1, steps_per_epoch=STEPS, momentum=0.0, backend=backend)
    calls = []
    inner = _closure(opt, weight, bias, 0)

    def closure():
        calls.append(torch.is_grad_enabled())
        return inner()

    before = weight.detach().clone()
    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True]
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    torch.testing.assert_close(weight.detach(), before - 0.1 * weight.grad)
    marker = object()
    assert opt.step(lambda: marker) is marker
    assert opt.step() is None
    assert opt.step_in_epoch == 3


# ------------------------------------------------------------------------------------- copies and pickling
def _pickled(obj):
    return pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("make_copy", [copy.deepcopy, _pickled], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("backend, optim_input", INPUTS)
def test_copy_of_model_and_optimizer_continues_identically(backend, optim_input, make_copy) -> None:
    """test_deepcopy_copies_all_public_attrs, and what BB documents beyond it: a copy of model and optimizer
    together continues exactly as the original, across epoch ends."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    with torch.no_grad():
        for index, p in enumerate(model.parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(index)))
    opt = BB(model.parameters(), **_kwargs(backend, optim_input))
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))

    def closure(model, opt):
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    for _ in range(STEPS + 1):
        _step(opt, functools.partial(closure, model, opt))
    twin_model, twin = make_copy((model, opt))
    public = {key for key in vars(opt) if not key.startswith("_")}
    assert public == {key for key in vars(twin) if not key.startswith("_")}
    hyper = public - {"state", "param_groups", "defaults"}
    assert {key: getattr(twin, key) for key in hyper} == {key: getattr(opt, key) for key in hyper}
    # torch.optim.Optimizer.__setstate__ adds defaults["differentiable"] = False to every copy (BB's has no such key)
    assert {k: v for k, v in twin.defaults.items() if k != "differentiable"} == opt.defaults
    _assert_same(opt.state_dict(), twin.state_dict())
    for _ in range(2 * STEPS):
        _step(opt, functools.partial(closure, model, opt))
        _step(twin, functools.partial(closure, twin_model, twin))
    _assert_same_params(list(model.parameters()), list(twin_model.parameters()))
    _assert_same(opt.state_dict(), twin.state_dict())
    assert opt.epoch == 3


# --------------------------------------------------------------------- the step: SGD in epoch 0, every dtype
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend, optim_input", INPUTS)
def test_first_epoch_is_torch_sgd(backend, optim_input, dtype) -> None:
    """Until its first rate period ends BB is torch.optim.SGD(lr, momentum=μ, dampening=μ, weight_decay) with a
    momentum buffer that starts at zero (BB's momentum μ in its EMA form), group by group; so are its gradient
    semantics: a parameter whose gradient is None in torch (frozen, unused, or after zero_grad(set_to_none=True)
    without backward) stays untouched, even with weight decay, and one whose gradient was zeroed with
    set_to_none=False decays. Compared step by step, in every supported dtype."""
    kwargs = _kwargs(backend, optim_input)
    if kwargs["steps_per_epoch"] is not None:
        kwargs["steps_per_epoch"] = 100
    lr, weight_decay = float(kwargs["lr"] if "lr" in kwargs else 0.1), kwargs.get("weight_decay", 0.0)
    models, params = [], []
    for _ in range(2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Sigmoid(), torch.nn.Linear(4, 2)).to(dtype)
        model.register_parameter("unused", torch.nn.Parameter(torch.ones(5, dtype=dtype)))
        model[2].bias.requires_grad_(False)
        models.append(model)
        params.append([model[0].weight, model[2].weight, model.unused, model[0].bias, model[2].bias])
    groups = [
        [{"params": ps[:3]}, {"params": ps[3:], "weight_decay": 0.0}] for ps in params
    ]  # frozen and unused parameters in both groups
    bb = BB(groups[1], **kwargs)
    momentum = bb.state_dict()["bb"]["momentum"]
    sgd = torch.optim.SGD(
        groups[0], lr=lr, momentum=momentum, dampening=momentum, weight_decay=weight_decay, foreach=False
    )
    if momentum > 0:
        # torch starts a buffer at the first step's d; BB's starts at zero: a zero buffer already in torch's state
        # makes its first step μ · 0 + (1 - μ) · d, as BB's
        for p in params[0]:
            sgd.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    untouched = [model.unused.detach().clone(), model[2].bias.detach().clone()]
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)

    def closure(model, opt, set_to_none=True):
        opt.zero_grad(set_to_none=set_to_none)
        loss = model(x).square().mean()
        loss.backward()
        return loss

    schedule = [
        ("backward", True),
        ("closure", False),
        ("zero_grad only", False),  # zeroed gradients: weight decay alone
        ("zero_grad only", True),  # no gradients: nothing moves
        ("closure", True),
        ("backward", False),
    ]
    for what, set_to_none in schedule:
        for model, opt in zip(models, (sgd, bb)):
            if what == "closure":
                opt.step(functools.partial(closure, model, opt, set_to_none))
                continue
            if what == "backward":
                closure(model, opt, set_to_none)
            else:
                opt.zero_grad(set_to_none=set_to_none)
            opt.step()
        for p, q in zip(params[0], params[1]):
            torch.testing.assert_close(q.detach(), p.detach(), msg=functools.partial("after {}: {}".format, what))
        for q, value in zip((models[1].unused, models[1][2].bias), untouched):
            assert torch.equal(q.detach(), value)
    assert bb.epoch == 0 and bb.lr == lr


# ------------------------------------------------------------------------------------ parameters without grad
@pytest.mark.parametrize("backend, optim_input", INPUTS)
def test_step_is_noop_when_params_have_no_grad(backend, optim_input) -> None:
    """test_step_is_noop_when_params_have_no_grad (which never checks the parameters; this does), through an epoch
    end: tensors that do not require grad, weight decay or not, do not move; the step counts."""
    params = [torch.randn(2, 3, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    old = [p.clone() for p in params]
    opt = BB(params, **_kwargs(backend, optim_input))
    for _ in range(STEPS + 1):
        assert _step(opt, lambda: torch.tensor([1.0])).item() == 1.0
    assert all(torch.equal(p, q) for p, q in zip(params, old))
    assert (opt.epoch, opt.step_in_epoch) == (1, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_is_noop_for_zero_grads(backend) -> None:
    """test_step_is_noop_for_zero_grads: zero gradients without weight decay leave the parameter as it is (the
    assigned gradient is copied into BB's buffer, with the documented warning)."""
    param = torch.randn((5, 1), requires_grad=True)
    old = param.detach().clone()
    opt = BB([param], lr=0.1, steps_per_epoch=STEPS, backend=backend)
    param.grad = torch.zeros_like(param)
    with pytest.warns(GradientReplacedWarning, match="was replaced by another tensor"):
        opt.step(lambda: torch.tensor([1.0]))
    assert torch.equal(param.detach(), old)


# ---------------------------------------------------------------------------------- lr: tensor and NumPy
@pytest.mark.parametrize(
    "lr",
    [torch.tensor(0.05), torch.tensor([0.05], dtype=torch.float64), np.float64(0.05), np.float32(0.05)],
    ids=["tensor", "one-element-float64", "numpy-float64", "numpy-float32"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_and_numpy_lr_match_float_lr(backend, lr) -> None:
    """test_tensor_lr: the same trajectory as the float rate, step by step, across epoch ends."""
    weight, bias = _linear()
    weight_c, bias_c = _twin(weight, bias)
    opt_r = BB([weight, bias], lr=float(lr), steps_per_epoch=STEPS, backend=backend)
    opt = BB([weight_c, bias_c], lr=lr, steps_per_epoch=STEPS, backend=backend)
    for step in range(3 * STEPS):
        _step(opt_r, _closure(opt_r, weight, bias, step))
        _step(opt, _closure(opt, weight_c, bias_c, step))
        _assert_same_params([weight, bias], [weight_c, bias_c])
    assert opt.lr_history == opt_r.lr_history and len(set(opt.lr_history)) > 1


# -------------------------------------------------------------------------------------- goes right direction
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "non-contiguous"])
@pytest.mark.parametrize("backend, optim_input", INPUTS)
def test_goes_right_direction(backend, optim_input, contiguous) -> None:
    """test_forloop_goes_right_direction: closure steps lower the loss tenfold; non-contiguous parameters keep their
    values and Parameter objects when packed.

    torch's 20 steps are too few for that with the default momentum μ = 0.9: its EMA form is the heavy ball with
    β = μ, whose two roots in each direction of a quadratic multiply to μ, so once the momentum has built up the
    loss falls by at best about μ per step, whatever the rate (0.9 ** 20 ≈ 0.12: tenfold in 20 steps is at the edge
    of the possible). 80 steps (20 epochs) leave the rate control room to find its rate."""
    generator = torch.Generator().manual_seed(0)
    if contiguous:
        weight = torch.nn.Parameter(torch.randn(10, 5, generator=generator))
        bias = torch.nn.Parameter(torch.randn(10, generator=generator))
    else:
        weight = torch.nn.Parameter(torch.randn(10, 5, 2, generator=generator)[..., 0])
        bias = torch.nn.Parameter(torch.randn(10, 2, generator=generator)[..., 0])
    values = [weight.detach().clone(), bias.detach().clone()]
    x = 0.3 * torch.randn(5, generator=generator)  # curvature below 6: the paper's fallback rate 1/3 is stable
    opt = BB([weight, bias], **_kwargs(backend, optim_input))
    assert opt.param_groups[0]["params"][0] is weight
    assert torch.equal(weight.detach(), values[0]) and torch.equal(bias.detach(), values[1])

    def closure():
        opt.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(20 * STEPS):
        _step(opt, closure)
    assert opt.epoch == 20
    assert closure().item() < initial / 10


# ----------------------------------------------------------------------------- defaults, groups, state, repr
@pytest.mark.parametrize("backend, optim_input", INPUTS)
def test_defaults_groups_state_and_repr(backend, optim_input) -> None:
    """``defaults`` holds the per-group hyper-parameters as floats (lr, weight_decay; the rest are BB's global
    attributes), every group has exactly those keys, ``state`` holds every parameter's state (test_non_empty_state)
    shaped like it (with momentum, the default's 0.9, a momentum buffer too), and the repr
    (test_optimizer_can_be_printed) lists the groups with the current rate."""
    kwargs = _kwargs(backend, optim_input)
    lr, weight_decay = float(kwargs.get("lr", 0.1)), float(kwargs.get("weight_decay", 0.0))
    weight, bias = _linear()
    opt = BB(_grouped(weight, bias), **kwargs)
    assert opt.defaults == {"lr": lr, "weight_decay": weight_decay}
    assert all(type(value) is float for value in opt.defaults.values())
    assert [sorted(g) for g in opt.param_groups] == [["lr", "params", "weight_decay"]] * 2
    assert [g["weight_decay"] for g in opt.param_groups] == [weight_decay, 0.0]
    assert (opt.steps_per_epoch, opt.beta) == (kwargs["steps_per_epoch"], kwargs.get("beta", 1.0))
    for step in range(STEPS):
        _step(opt, _closure(opt, weight, bias, step))
    assert list(opt.state) == [weight, bias]
    control = SafeguardControl if kwargs.get("safeguard", True) else PaperControl
    momentum = kwargs.get("momentum", control.DEFAULT_MOMENTUM)
    assert opt.state_dict()["bb"]["momentum"] == momentum
    keys = ["ema", "momentum_buffer", "prev_ema", "prev_params"] if momentum > 0 else ["ema", "prev_ema", "prev_params"]
    for p in (weight, bias):
        assert sorted(opt.state[p]) == keys
        assert all(value.shape == p.shape for value in opt.state[p].values())
    assert opt.state[weight]["prev_params"].equal(weight.detach())  # the epoch-end snapshot, just taken
    text = repr(opt)
    assert text.startswith("BB (\nParameter Group 0\n") and "Parameter Group 1\n" in text
    assert text.count(f"    lr: {opt.lr}\n") == 2 and f"    weight_decay: {weight_decay}\n" in text


# ------------------------------------------------------------------------------------------------ zero_grad
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_grad_set_to_none_false_as_torch_optim(backend) -> None:
    """zero_grad(set_to_none=False): the gradients that exist are zeroed in place (same tensors), the next backward
    accumulates into them from zero, and two backwards add up, as with torch.optim.SGD."""
    weight, bias = _linear()
    weight_r, bias_r = _twin(weight, bias)
    opt = BB([weight, bias], lr=0.1, steps_per_epoch=STEPS, momentum=0.0, backend=backend)  # as the plain SGD
    sgd = torch.optim.SGD([weight_r, bias_r], lr=0.1)
    for o, w, b in ((opt, weight, bias), (sgd, weight_r, bias_r)):
        _closure(o, w, b, 0)()
        grad = w.grad
        o.zero_grad(set_to_none=False)
        assert w.grad is grad and not w.grad.any()
        x = torch.randn(3, generator=torch.Generator().manual_seed(1))
        for _ in range(2):
            (w.mv(x) + b).pow(2).sum().backward()
        assert w.grad is grad
    torch.testing.assert_close(weight.grad, weight_r.grad, rtol=0, atol=0)
    torch.testing.assert_close(bias.grad, bias_r.grad, rtol=0, atol=0)
    opt.step()
    sgd.step()
    torch.testing.assert_close(weight.detach(), weight_r.detach())


# ---------------------------------------------------------------------------------------------- deviations
def test_deviation_global_lr_group_writes_scale_the_one_rate() -> None:
    """One global learning rate: a scheduler's writes scale it (every group alike, the run of a global factor); a
    write of another value to one group (test_param_groups_lr's 1e-28) warns once, and the first value written
    scales every group."""
    weight, bias = _linear()
    opt = BB(_grouped(weight, bias), lr=0.1, steps_per_epoch=STEPS, backend="eager")
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(2):
        with _recorded_warnings() as warned:
            _step(opt, _closure(opt, weight, bias, step))
        assert warned == []
        scheduler.step()
    assert opt.lr == pytest.approx(0.025) and [g["lr"] for g in opt.param_groups] == [0.025, 0.025]
    opt.param_groups[1]["lr"] = 1e-28
    with _recorded_warnings() as warned:
        _step(opt, _closure(opt, weight, bias, 2))
    assert len(warned) == 1 and "different values" in str(warned[0].message)
    assert opt.lr == pytest.approx(1e-28) and [g["lr"] for g in opt.param_groups] == [1e-28, 1e-28]


def test_deviation_closed_form_schedulers_set_the_rate_outright() -> None:
    """A scheduler that steps from the group's current rate scales BB's rate across its epoch ends; one that computes
    the rate from the rate it recorded when built (LambdaLR) sets it outright, replacing BB's changes: a LambdaLR of
    a constant 1 pins the rate at lr, where MultiplicativeLR of 1 leaves BB's own rates (docs/behaviour.md)."""
    histories = {}
    for name in ("none", "MultiplicativeLR", "LambdaLR"):
        weight, bias = _linear()
        opt = BB(_grouped(weight, bias), lr=0.05, steps_per_epoch=STEPS, backend="eager")
        kind = getattr(torch.optim.lr_scheduler, name, None)
        scheduler = kind(opt, lambda step: 1.0) if kind is not None else None
        for step in range(3 * STEPS):
            _step(opt, _closure(opt, weight, bias, step))
            if scheduler is not None:
                scheduler.step()
        histories[name] = opt.lr_history
    assert histories["MultiplicativeLR"] == histories["none"] and len(set(histories["none"])) == 3
    assert histories["LambdaLR"][1:] == [0.05, 0.05]  # from the second epoch on: lr, whatever BB estimated


def test_deviation_per_group_lr_at_construction_is_ignored_with_a_warning() -> None:
    """test_param_groups_lr builds groups with their own lr beside an outer lr of 1e-28: BB warns that the group's
    rate is ignored and trains every group with the outer one, the run of an optimizer without group rates."""
    runs = []
    for group_lr in (None, 1e-3):
        weight, bias = _linear()
        groups = [{"params": [weight]} | ({"lr": group_lr} if group_lr else {}), {"params": [bias]}]
        with _recorded_warnings() as caught:
            opt = BB(groups, lr=0.05, steps_per_epoch=STEPS, backend="eager")
        for step in range(2 * STEPS):
            _step(opt, _closure(opt, weight, bias, step))
        runs.append(
            ([weight.detach().clone(), bias.detach().clone()], opt.lr_history, [str(w.message) for w in caught])
        )
    assert runs[0][2] == []
    assert runs[1][2] == [
        "bbfused.BB uses one global learning rate: the per-group lr [0.001] is ignored "
        "(lr=0.05 is used for every group)"
    ]
    _assert_same_params(runs[1][0], runs[0][0])
    assert runs[1][1] == runs[0][1]


def test_deviation_loaded_group_lr_is_ignored_the_bb_entry_sets_the_rate() -> None:
    """A state dict's groups show the rate for reading; the rate loaded is the "bb" entry's (one global rate). So
    test_load_state_dict_pre_hook_and_prepend's edit of param_groups[0]["lr"] changes nothing (silently)."""
    weight, bias = _linear()
    opt = BB(_grouped(weight, bias), lr=0.1, steps_per_epoch=STEPS, backend="eager")
    state_dict = opt.state_dict()
    assert [g["lr"] for g in state_dict["param_groups"]] == [0.1, 0.1] and state_dict["bb"]["lr"] == 0.1
    state_dict["param_groups"][0]["lr"] = 0.002
    opt.load_state_dict(state_dict)
    assert opt.lr == 0.1 and [g["lr"] for g in opt.param_groups] == [0.1, 0.1]
    state_dict["bb"]["lr"] = 0.003
    opt.load_state_dict(state_dict)
    assert opt.lr == 0.003 and [g["lr"] for g in opt.param_groups] == [0.003, 0.003]


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_deviation_complex_params_refused(dtype) -> None:
    """No complex parameters (test_complex mixes complex and real ones): a TypeError that names the parameter and
    the fix, before any parameter is re-pointed; their real view is the way in."""
    real = torch.nn.Parameter(torch.randn(10, 5))
    complex_param = torch.nn.Parameter(torch.randn(10, dtype=dtype))
    pointers = [real.data_ptr(), complex_param.data_ptr()]
    with pytest.raises(TypeError) as raised:
        BB([("real", real), ("z", complex_param)], lr=0.1, steps_per_epoch=STEPS, backend="eager")
    assert str(raised.value) == (
        f"parameter 'z' (shape (10,), dtype {dtype}, device cpu): BB optimizes real floating-point parameters "
        "(float64, float32, float16, bfloat16); convert it or leave it out of the optimizer"
    )
    assert [real.data_ptr(), complex_param.data_ptr()] == pointers
    assert real.grad is None and complex_param.grad is None
    as_real = torch.nn.Parameter(torch.view_as_real(complex_param.detach()).clone())
    assert BB([real, as_real], lr=0.1, steps_per_epoch=STEPS, backend="eager").param_groups[0]["params"][1] is as_real


@pytest.mark.parametrize("backend", BACKENDS)
def test_deviation_zero_grad_set_to_none_keeps_zeroed_gradient_views(backend) -> None:
    """zero_grad(set_to_none=True) cannot set ``p.grad`` to None (it is a view of BB's flat buffer): the gradient
    stays the same zeroed tensor, and the step treats the parameter as torch.optim treats a None gradient: it does
    not move, even with weight decay, until backward (or a write to .grad) gives it a gradient."""
    weight, bias = _linear()
    # momentum=0.0: the weight's step is checked against a plain SGD step with weight decay
    opt = BB([weight, bias], lr=0.1, steps_per_epoch=STEPS, weight_decay=0.5, momentum=0.0, backend=backend)
    _closure(opt, weight, bias, 0)()
    grad = weight.grad
    opt.zero_grad(set_to_none=True)
    assert weight.grad is grad and not grad.any()
    before = [weight.detach().clone(), bias.detach().clone()]
    opt.step()
    _assert_same_params([weight, bias], before)
    weight.grad.fill_(1.0)  # an in-place write gives the weight a gradient; the bias still has none
    opt.step()
    torch.testing.assert_close(weight.detach(), before[0] - 0.1 * (1.0 + 0.5 * before[0]))
    assert torch.equal(bias.detach(), before[1])


def test_deviation_duplicate_parameter_in_a_group_is_an_error() -> None:
    """torch.optim warns about a parameter listed twice in one group (torch's generic error inputs expect a
    UserWarning) and optimizes it once; BB raises, naming both places, before writing anything."""
    p = torch.nn.Parameter(torch.ones(1, 1))
    pointer = p.data_ptr()
    with pytest.raises(ValueError) as raised:
        BB([p, p], lr=0.1, steps_per_epoch=STEPS, backend="eager")
    assert str(raised.value) == (
        "parameter param_groups[0]['params'][1] (shape (1, 1)) is listed twice (also as "
        "param_groups[0]['params'][0]); list each parameter once"
    )
    assert p.data_ptr() == pointer and p.grad is None


def test_deviation_tensor_lr_is_read_once() -> None:
    """torch.optim keeps a tensor lr in the groups (an in-place change to it changes the rate); BB reads it once, as
    its documentation says, and the groups show BB's rate as a float: writing the tensor later changes nothing."""
    lr = torch.tensor(0.05, dtype=torch.float64)
    weight, bias = _linear()
    opt = BB([weight, bias], lr=lr, steps_per_epoch=STEPS, backend="eager")
    assert type(opt.param_groups[0]["lr"]) is float and opt.param_groups[0]["lr"] == float(lr)
    weight_r, bias_r = _twin(weight, bias)
    reference = BB([weight_r, bias_r], lr=0.05, steps_per_epoch=STEPS, backend="eager")
    lr.fill_(1e3)
    for step in range(STEPS + 1):
        _step(opt, _closure(opt, weight, bias, step))
        _step(reference, _closure(reference, weight_r, bias_r, step))
    _assert_same_params([weight, bias], [weight_r, bias_r])
    assert opt.lr_history == reference.lr_history == [0.05]
