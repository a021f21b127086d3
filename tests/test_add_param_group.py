"""BB.add_param_group after construction: the group's buffers, when it joins the BB estimate, rollbacks, checkpoints,
copies and bad input. Eager backend; tests/test_backends.py compares the fused backends on an added group."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from test_optimizer import quadratic_gradient

from bbfused import BB

STEPS = 4


def _inside(tensor: torch.Tensor, flat: torch.Tensor) -> bool:
    """Whether ``tensor``'s memory lies in flat buffer ``flat``'s (each parameter has a storage slice of its own)."""
    start = flat.data_ptr()
    return start <= tensor.data_ptr() and tensor.data_ptr() + tensor.numel() * tensor.element_size() <= (
        start + flat.numel() * flat.element_size()
    )


def _thetas() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in [(4, 3), (7,), (2, 5)]]


def _join_epoch(add_step: int, steps: int) -> int:
    """The documented rule, restated: before the first step as the constructor's groups; at an epoch start k,
    from the end of epoch k + 1; mid-epoch k, from the end of epoch k + 2."""
    if add_step == 0:
        return 0
    epoch, step = divmod(add_step, steps)
    return epoch + (1 if step == 0 else 2)


def reference_with_added(add_steps, weight_decays, lr, beta, epochs, taus, exclude_new=True):
    """Algorithm 1 in float64 over tensors that enter at global step ``add_steps[i]`` (untouched before), with
    tensor i in the BB sums from epoch end ``_join_epoch`` on (``exclude_new=False``: always, which is what a
    parameter frozen in the optimizer from the start and unfrozen at that step gets)."""
    tau0, tau_min, tau_max = taus
    thetas = _thetas()
    join = [_join_epoch(a, STEPS) if exclude_new else 0 for a in add_steps]
    history, prev_theta, prev_g, global_step = [], None, None, 0
    for k in range(epochs):
        g = [torch.zeros_like(t) for t in thetas]
        for _ in range(STEPS):
            for i, (theta, wd) in enumerate(zip(thetas, weight_decays)):
                if global_step >= add_steps[i]:
                    d = quadratic_gradient(theta, i, global_step) + wd * theta
                    thetas[i] = theta - lr * d
                    g[i] = (1 - beta) * g[i] + beta * d
            global_step += 1
        history.append(lr)
        if k >= 1:
            members = [i for i in range(len(thetas)) if join[i] <= k]
            dtheta = torch.cat([(thetas[i] - prev_theta[i]).flatten() for i in members])
            y = torch.cat([(g[i] - prev_g[i]).flatten() for i in members])
            ratio = float(dtheta @ dtheta) / (STEPS * abs(float(dtheta @ y)))
            lr = ratio if tau_min / (k + 2) <= ratio <= tau_max / (k + 2) else tau0 / (k + 2)
        prev_theta, prev_g = [t.clone() for t in thetas], [t.clone() for t in g]
    return thetas, history, lr


@pytest.mark.parametrize(
    "add_steps",
    [(0, 0, 0), (0, 2 * STEPS, 0), (0, STEPS + 2, 3 * STEPS + 1)],
    ids=["before-first-step", "epoch-start", "mid-epoch"],
)
def test_added_groups_follow_the_float64_reference(add_steps) -> None:
    """Tensor 0 is given to the constructor, tensors 1 and 2 are added at their step (step 0: before the first
    step). The paper's method, so the float64 reference states the whole semantics."""
    epochs, lr, beta, taus = 7, 0.05, 0.3, (1.0, 1e-4, 1e4)
    weight_decays = [1e-2, 0.0, 1e-3]
    thetas, history, final_lr = reference_with_added(add_steps, weight_decays, lr, beta, epochs, taus)

    params = [torch.nn.Parameter(t) for t in _thetas()]
    opt = BB(
        [{"params": [params[0]], "weight_decay": weight_decays[0]}],
        lr=lr,
        steps_per_epoch=STEPS,
        beta=beta,
        tau0=taus[0],
        tau_min=taus[1],
        tau_max=taus[2],
        backend="eager",
        safeguard=False,
    )
    for step in range(epochs * STEPS):
        for i in (1, 2):
            if add_steps[i] == step:
                opt.add_param_group({"params": [params[i]], "weight_decay": weight_decays[i]})
        opt.zero_grad()
        for i, p in enumerate(params):
            if step >= add_steps[i]:
                p.grad.copy_(quadratic_gradient(p.detach(), i, step))
        opt.step()

    assert len(opt.param_groups) == 3
    torch.testing.assert_close(torch.tensor(opt.lr_history), torch.tensor(history), rtol=1e-12, atol=0)
    assert opt.lr == pytest.approx(final_lr, rel=1e-12)
    for p, theta in zip(params, thetas):
        torch.testing.assert_close(p.detach(), theta, rtol=1e-12, atol=1e-14)
    # The BB rule chose the rates (not the fallback), and later groups' join epochs decide them: counting a later
    # group from its first epoch end on (as a parameter frozen in BB from the start would be) gives other rates.
    assert len(set(history[2:])) == epochs - 2 and all(h != 1.0 / (k + 2) for k, h in enumerate(history[2:], 1))
    _, naive_history, _ = reference_with_added(add_steps, weight_decays, lr, beta, epochs, taus, exclude_new=False)
    assert (naive_history == history) == (add_steps == (0, 0, 0))


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _train(model, opt, start: int, count: int, losses: dict[int, float] | None = None) -> None:
    """Steps ``start`` .. ``start + count - 1`` on fixed batches; the loss given to BB (the real one unless
    ``losses`` overrides a step's)."""
    for step in range(start, start + count):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(16, 6, generator=generator)
        y = torch.randint(0, 3, (16,), generator=generator)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=(losses or {}).get(step, loss))


def _head_opt(model, **kwargs) -> BB:
    """BB over the last layer only; the first layer is added later."""
    return BB([{"params": model[2].parameters(), "weight_decay": 1e-3}], lr=0.2, steps_per_epoch=STEPS, **kwargs)


PAPER = dict(backend="eager", safeguard=False, tau_min=1e-4, tau_max=1e4)


def _add_body(opt: BB, model) -> None:
    opt.add_param_group({"params": list(model[0].parameters()), "weight_decay": 0.0})


@pytest.mark.parametrize("safeguard", [True, False], ids=["default", "paper"])
def test_group_added_before_the_first_step_equals_one_given_to_the_constructor(safeguard: bool) -> None:
    model = _model()
    built = BB(
        [{"params": model[2].parameters(), "weight_decay": 1e-3}, {"params": model[0].parameters()}],
        lr=0.2,
        steps_per_epoch=STEPS,
        backend="eager",
        safeguard=safeguard,
    )
    _train(model, built, 0, 6 * STEPS)

    added_model = _model()
    added = _head_opt(added_model, backend="eager", safeguard=safeguard)
    _add_body(added, added_model)
    _train(added_model, added, 0, 6 * STEPS)

    assert added.lr_history == built.lr_history and len(set(built.lr_history)) > 2
    for p, q in zip(model.parameters(), added_model.parameters()):
        assert torch.equal(p, q)
    assert added.state_dict()["bb"] == built.state_dict()["bb"]


def test_added_parameters_step_from_the_next_step_with_the_defaults() -> None:
    """Options not given come from the constructor (weight_decay here, and the default momentum 0.9, whose buffer
    starts at zero for the new group); the group shows BB's current rate, and its own lr is ignored with a warning.
    A gradient computed before the add counts in the next step."""
    model = _model()
    opt = BB(model[2].parameters(), lr=0.2, steps_per_epoch=2, weight_decay=0.1, backend="eager")
    _train(model, opt, 0, 5)  # the rate has changed by now: epoch 2 uses the BB estimate
    assert opt.lr != 0.2
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(9))
    model(x).square().sum().backward()
    weight, grad = model[0].weight.detach().clone(), model[0].weight.grad.clone()
    with pytest.warns(UserWarning, match=r"the added group's lr 0.5 is ignored"):
        opt.add_param_group({"params": list(model[0].parameters()), "lr": 0.5, "note": "kept"})
    group = opt.param_groups[1]
    assert group["weight_decay"] == 0.1 and group["note"] == "kept"
    assert group["lr"] is opt.param_groups[0]["lr"] and group["lr"] == opt.lr
    lr = opt.lr
    opt.step()
    # The EMA-form momentum from a zero buffer: m = (1 - 0.9)·d, θ ← θ − lr·m.
    direction = 0.1 * (grad + 0.1 * weight)
    torch.testing.assert_close(opt.state[model[0].weight]["momentum_buffer"], direction)
    torch.testing.assert_close(model[0].weight.detach(), weight - lr * direction)
    for p in model[0].parameters():  # packed as the constructor packs: views of the new group's flat buffer
        assert _inside(p, opt._buffers[1].param) and _inside(p.grad, opt._buffers[1].grad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no lr of its own: no warning
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})
    assert opt.param_groups[2]["weight_decay"] == 0.1 and opt.param_groups[2]["lr"] == opt.lr


@pytest.mark.parametrize("diverging_epoch", [1, 2], ids=["in-the-epoch-of-the-add", "a-later-epoch"])
def test_rollback_after_an_add_restores_the_snapshots(diverging_epoch: int) -> None:
    """Epoch 0 is good; the body is added in the middle of epoch 1. A rolled-back epoch returns every parameter to
    its snapshot: the body to its value at the add (epoch 1) or at the last good epoch end (epoch 2)."""
    model = _model()
    opt = _head_opt(model, backend="eager")
    # Epoch 0 makes progress from its first step's loss; the diverging epoch's mean loss is 9 times that.
    # Epoch 0's later losses near the real ones (about 1.1-1.3) so that epoch 1's real losses are no rise past it.
    losses = {0: 2.0, 1: 1.5, 2: 1.5, 3: 1.5}
    losses.update({step: 9.0 for step in range(diverging_epoch * STEPS, (diverging_epoch + 1) * STEPS)})
    _train(model, opt, 0, STEPS + 2, losses)
    # The head's snapshot is its value at the start of epoch 1, the body's its value now, at the add.
    snapshot = {
        name: (opt.state[p]["prev_params"] if name.startswith("2.") else p.detach()).clone()
        for name, p in model.named_parameters()
    }
    assert not torch.equal(snapshot["2.weight"], model[2].weight.detach())
    _add_body(opt, model)
    if diverging_epoch == 2:
        at_add = model[0].weight.detach().clone()
        _train(model, opt, STEPS + 2, STEPS - 2, losses)
        snapshot = {name: p.detach().clone() for name, p in model.named_parameters()}
        assert not torch.equal(snapshot["0.weight"], at_add)  # the epoch end, not the add, is what counts now
    start = opt.epoch * STEPS + opt.step_in_epoch
    _train(model, opt, start, (diverging_epoch + 1) * STEPS - start, losses)
    assert opt.rolled_back_epochs == [diverging_epoch]
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), snapshot[name]), name
    _train(model, opt, (diverging_epoch + 1) * STEPS, STEPS)  # goes on from there
    assert opt.rolled_back_epochs == [diverging_epoch] and not torch.equal(model[0].weight, snapshot["0.weight"])


@pytest.mark.parametrize("blow_up", [False, True])
def test_safeguard_weight_checks_cover_an_added_group(blow_up: bool) -> None:
    """A group added mid-epoch with weights far larger than the rest is no growth of the weights; the same group
    blown up in that epoch is, and is rolled back to its value at the add (the rest to the epoch start)."""
    small = torch.nn.Parameter(torch.full((4,), 0.1))
    opt = BB([small], lr=0.1, steps_per_epoch=STEPS, backend="eager")
    large = torch.nn.Parameter(torch.full((100,), 10.0))
    for step in range(2 * STEPS):
        if step == STEPS:
            small_at_epoch_start = small.detach().clone()
        if step == STEPS + 1:
            opt.add_param_group({"params": [large]})
            at_add = large.detach().clone()
        opt.zero_grad()
        small.grad.copy_(small.detach())
        if step > STEPS:
            large.grad.copy_(large.detach() * (-100.0 if blow_up and step == STEPS + 2 else 0.01))
        opt.step()
    assert opt.rolled_back_epochs == ([1] if blow_up else [])
    assert (
        torch.equal(large.detach(), at_add) == blow_up and torch.equal(small.detach(), small_at_epoch_start) == blow_up
    )


def _save(opt: BB, model) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    return buffer


def test_state_dict_after_an_add_round_trips_into_an_optimizer_with_the_same_groups() -> None:
    """Saved in epoch 2 after the body was added in the middle of epoch 1 (so it joins the estimate at the end of
    epoch 3); resumed in an optimizer that added the body before its first step, it continues bit for bit. The
    paper's method with wide bounds, so that every rate is the estimate itself."""
    model = _model()
    opt = _head_opt(model, **PAPER)
    _train(model, opt, 0, STEPS + 2)
    _add_body(opt, model)
    _train(model, opt, STEPS + 2, STEPS + 1)
    saved = _save(opt, model)
    assert opt.state_dict()["bb"]["join_epochs"] == [0, 3]
    _train(model, opt, 2 * STEPS + 3, 4 * STEPS)
    uninterrupted = ([p.detach().clone() for p in model.parameters()], opt.lr_history, opt.lr)

    def resume(edit=lambda state: None) -> tuple[list[torch.Tensor], list[float]]:
        checkpoint = torch.load(io.BytesIO(saved.getvalue()))
        edit(checkpoint["opt"]["bb"])
        other_model = _model()
        other = _head_opt(other_model, **PAPER)
        _add_body(other, other_model)
        other_model.load_state_dict(checkpoint["model"])
        other.load_state_dict(checkpoint["opt"])
        _train(other_model, other, 2 * STEPS + 3, 4 * STEPS)
        return [p.detach().clone() for p in other_model.parameters()], other.lr_history, other.lr

    resumed = resume()
    assert resumed[1:] == uninterrupted[1:]
    for p, q in zip(resumed[0], uninterrupted[0]):
        assert torch.equal(p, q)

    # Without join_epochs (a version 2 state dict saved before groups could be added; a version 3 one must have
    # them) every group is in the estimate: here that is the wrong history for the body, and the rates differ
    # from epoch 3's end on.
    def as_version_2(bb: dict) -> None:
        del bb["join_epochs"]
        bb["version"] = 2

    without = resume(as_version_2)
    assert without[1][:3] == uninterrupted[1][:3] and without[1][3] != uninterrupted[1][3]


def test_state_dict_with_added_groups_rejects_other_groups() -> None:
    model = _model()
    opt = _head_opt(model, backend="eager")
    _train(model, opt, 0, 3)
    _add_body(opt, model)
    state = opt.state_dict()

    other_model = _model()
    other = _head_opt(other_model, backend="eager")
    with pytest.raises(ValueError, match=r"2 parameter groups, this optimizer 1.*add_param_group"):
        other.load_state_dict(state)
    other.add_param_group({"params": [other_model[0].weight]})  # the bias is missing
    with pytest.raises(ValueError, match=r"param_groups\[1\] has 1 parameters, the state dict 2"):
        other.load_state_dict(state)
    bad = opt.state_dict()
    bad["bb"]["join_epochs"] = [0]
    with pytest.raises(ValueError, match=r"join_epochs lists 1 parameter groups, param_groups 2"):
        opt.load_state_dict(bad)
    bad["bb"]["join_epochs"] = [0, -1]
    with pytest.raises(ValueError, match=r"join_epochs must be a list of ints >= 0"):
        opt.load_state_dict(bad)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_after_an_add_continues_exactly(how: str) -> None:
    model = _model()
    opt = _head_opt(model, backend="eager")
    _train(model, opt, 0, STEPS + 1)
    _add_body(opt, model)
    _train(model, opt, STEPS + 1, 2)
    if how == "deepcopy":
        model_copy, opt_copy = copy.deepcopy((model, opt))
    else:
        model_copy, opt_copy = pickle.loads(pickle.dumps((model, opt)))
    for p in model_copy.parameters():  # the copy's parameters are views of the copy's own buffers
        assert any(_inside(p, b.param) for b in opt_copy._buffers)
        assert not any(_inside(p, b.param) for b in opt._buffers)
    _train(model, opt, STEPS + 3, 4 * STEPS)
    _train(model_copy, opt_copy, STEPS + 3, 4 * STEPS)
    assert opt_copy.lr_history == opt.lr_history and opt_copy.state_dict()["bb"]["join_epochs"] == [0, 3]
    for p, q in zip(model.parameters(), model_copy.parameters()):
        assert torch.equal(p, q)


def _body_param() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.ones(3))


@pytest.mark.parametrize(
    "make_group, error, match",
    [
        (lambda head: [_body_param()], TypeError, "param_group must be a dict"),
        (lambda head: {"weight_decay": 0.1}, ValueError, "'params' entry"),
        (lambda head: {"params": []}, ValueError, r"param_groups\[1\] has no parameters"),
        (lambda head: {"params": {_body_param()}}, TypeError, "not a set"),
        (lambda head: {"params": [head.weight]}, ValueError, "some parameters appear in more than one parameter group"),
        (lambda head: {"params": [p := _body_param(), p]}, ValueError, r"params'\]\[1\] .*listed twice"),
        (
            lambda head: {"params": [_body_param()], "weight_decay": -1.0},
            ValueError,
            r"weight_decay of param_groups\[1\]",
        ),
        (
            lambda head: {"params": [_body_param()], "weight_decay": "a"},
            ValueError,
            r"weight_decay of param_groups\[1\]",
        ),
        (
            lambda head: {"params": [torch.nn.Parameter(torch.ones(3, dtype=torch.int64), requires_grad=False)]},
            TypeError,
            "real floating-point parameters",
        ),
        (lambda head: {"params": [torch.ones(3, requires_grad=True) * 2]}, ValueError, "non-leaf"),
        (lambda head: {"params": [torch.nn.Parameter(head.weight.data[0])]}, ValueError, "share memory"),
        (lambda head: {"params": [torch.nn.Parameter(torch.ones(1).expand(3))]}, ValueError, "expanded"),
        (lambda head: {"params": [torch.nn.Parameter(torch.ones(3, device="meta"))]}, ValueError, "meta device"),
        (lambda head: {"params": [("body", _body_param())]}, ValueError, "with/without names"),
        (
            lambda head: {"params": [torch.nn.Parameter(torch.ones(3))], "momentum": 0.0},
            ValueError,
            r"param_groups\[1\] sets momentum=0.0, but BB applies one momentum to every group \(momentum=0.9\)",
        ),
        (lambda head: {"params": [torch.nn.Parameter(torch.ones(3))], "nesterov": True}, ValueError, "one nesterov"),
        (lambda head: {"params": [torch.nn.Parameter(torch.ones(3))], "dampening": 0.1}, ValueError, "no dampening"),
    ],
    ids=[
        "not-a-dict",
        "no-params",
        "empty",
        "set",
        "in-another-group",
        "twice-in-the-group",
        "negative-weight-decay",
        "weight-decay-not-a-number",
        "integer-dtype",
        "non-leaf",
        "view-of-a-parameter",
        "expanded",
        "meta",
        "names-mixed",
        "momentum-of-its-own",
        "nesterov-of-its-own",
        "dampening",
    ],
)
def test_bad_groups_are_refused_before_anything_changes(make_group, error, match) -> None:
    head = torch.nn.Linear(3, 2)
    opt = BB(head.parameters(), lr=0.1, steps_per_epoch=STEPS, backend="eager")
    group = make_group(head)
    params = group.get("params", []) if isinstance(group, dict) else group
    pointers = [p.data_ptr() for p in params if isinstance(p, torch.Tensor) and not p.is_meta]
    with pytest.raises(error, match=match):
        opt.add_param_group(group)
    assert len(opt.param_groups) == 1 and len(opt._buffers) == 1 and len(opt.state) == 2
    assert [p.data_ptr() for p in params if isinstance(p, torch.Tensor) and not p.is_meta] == pointers
    weight = head.weight.detach().clone()
    head(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert not torch.equal(head.weight.detach(), weight)  # the optimizer still works


def test_groups_put_into_param_groups_directly_are_added() -> None:
    """A group appended to param_groups, or a new list that keeps the groups and adds one (what Lightning's
    BaseFinetuning assigns when it resumes), is added as add_param_group adds it, at the next call; removing or
    changing a group BB packed is refused."""
    head = torch.nn.Linear(3, 2)
    body = torch.nn.Parameter(torch.ones(3))
    opt = BB(head.parameters(), lr=0.1, steps_per_epoch=STEPS, momentum=0.0, backend="eager")  # plain SGD steps
    opt.param_groups.append({"params": [body]})
    opt.zero_grad()
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["weight_decay"] == 0.0 and body.grad is not None
    body.grad.fill_(1.0)
    opt.step()
    assert torch.equal(body.detach(), torch.full((3,), 0.9))

    other = torch.nn.Parameter(torch.ones(2))
    opt.param_groups = [dict(group, lr=0.5) for group in opt.param_groups] + [{"params": [other], "lr": 0.5}]
    with pytest.warns(UserWarning, match="the added group's lr 0.5 is ignored"):
        state = opt.state_dict()
    assert len(state["param_groups"]) == 3 and [group["lr"] for group in opt.param_groups] == [opt.lr] * 3
    assert _inside(other, opt._buffers[-1].param)
    assert opt.state[other]["prev_params"].tolist() == [1.0, 1.0]

    opt.param_groups = opt.param_groups[1:]
    with pytest.raises(RuntimeError, match=r"no longer starts with the 3 groups"):
        opt.step()


def test_group_options_at_the_global_values_are_taken_and_others_refused() -> None:
    """torch.optim.SGD's per-group momentum options: at BB's global values they are accepted (groups written for
    SGD), any other value is refused at construction, naming the group and the fix."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    same = [{"params": [a], "momentum": 0.9, "nesterov": False, "dampening": 0}, {"params": [b]}]
    BB(same, lr=0.1, steps_per_epoch=STEPS, backend="eager")
    other = [{"params": [a]}, {"params": [b], "momentum": 0.0}]
    with pytest.raises(ValueError, match=r"param_groups\[1\] sets momentum=0.0.*build BB with momentum=0.0"):
        BB(other, lr=0.1, steps_per_epoch=STEPS, backend="eager")
    paper = [{"params": [a], "momentum": 0.9}]  # the paper's method has no momentum unless given
    with pytest.raises(ValueError, match=r"sets momentum=0.9, but BB applies one momentum to every group \(momentum=0"):
        BB(paper, lr=0.1, steps_per_epoch=STEPS, backend="eager", safeguard=False)
