"""The default control's dead-unit test (``bbfused.control.live_gradients``): the count of non-zero gradient values
every backend takes, the clocks' step before a period's end, and whole runs: a rate that kills a deep ReLU net's
units is rolled back, a small last batch is not, under every clock and across a checkpoint; without a known epoch
length the test is off. The decision's arithmetic against the kernels is in tests/test_safeguard_kernel.py."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from test_control import BACKENDS

from bbfused import BB, checkpoint, clock_kernels
from bbfused.backends import triton_backend
from bbfused.backends.eager import EagerBackend
from bbfused.clock import HISTORY_CAPACITY, DeviceClock, HostClock, KernelDeviceClock
from bbfused.control import safeguard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "robustness"))
import suite  # noqa: E402  (by its own name, as tests/test_robustness.py imports it)

# Every backend, and the Triton one again with every buffer counted by many programs and a second launch.
SHARE_BACKENDS = [(EagerBackend(), False), *((backend, False) for backend in BACKENDS)]
SHARE_BACKENDS += [(backend, True) for backend in BACKENDS if backend.name == "triton"]


def _share_backend(case, monkeypatch):
    backend, many_programs = case
    if many_programs:  # every buffer on the many-programs path, each program over several blocks
        monkeypatch.setattr(triton_backend, "SHARE_PROGRAM_LIMIT", 0)
        monkeypatch.setattr(triton_backend, "EPOCH_PROGRAMS", 2)
    return backend


@pytest.mark.parametrize("case", SHARE_BACKENDS, ids=lambda c: c[0].name + (" (many programs)" if c[1] else ""))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [0, 1, 17, 1024, 5000])
def test_every_backend_counts_the_non_zero_values(case, dtype: torch.dtype, n: int, monkeypatch) -> None:
    """Exact counts of the values that are finite and not zero (NaN, inf and -0.0 do not count; float64's smallest
    and largest values do); added to what ``out`` holds with ``add``; a false flag reads nothing and leaves ``out`` as
    it was."""
    backend = _share_backend(case, monkeypatch)
    generator = torch.Generator().manual_seed(n)
    grad = torch.randn(n, generator=generator).to(dtype)
    grad[torch.rand(n, generator=generator) < 0.4] = 0
    if n >= 4:
        grad[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 0.0]).to(dtype)
    if n >= 6 and dtype == torch.float64:
        grad[4:6] = torch.tensor([5e-324, 1.7e308], dtype=dtype)  # zero and inf in float32
    expected = int(((grad != 0) & torch.isfinite(grad)).sum())
    assert expected > 0 or n < 4
    out = torch.tensor(7.0, dtype=torch.float64)
    backend.nonzero_share(grad, out)
    assert out.dtype == torch.float64 and float(out) == expected
    backend.nonzero_share(grad, out, add=True, enabled=torch.tensor(True))
    assert float(out) == 2 * expected
    backend.nonzero_share(grad, out, enabled=torch.tensor(False))
    assert float(out) == 2 * expected
    backend.nonzero_share(grad, out, total=3.0)
    assert float(out) == expected / 3.0  # divided in float64, as the eager backend divides
    backend.nonzero_share(grad, out, skip=torch.tensor([1.0]))  # GradScaler's found_inf: a skipped step
    assert float(out) == expected / 3.0
    backend.nonzero_share(grad, out, skip=torch.tensor([0.0]))
    assert float(out) == expected


@pytest.mark.parametrize("case", SHARE_BACKENDS, ids=lambda c: c[0].name + (" (many programs)" if c[1] else ""))
def test_a_slot_chooses_which_of_two_counts_a_launch_writes(case, monkeypatch) -> None:
    """A period's two counts as one launch: the slot flag writes out[1] (the closing step), the enabled flag alone
    out[0] (the step before it), neither nothing, nor a skipped step."""
    backend = _share_backend(case, monkeypatch)
    grad = torch.tensor([0.0, 1.0, -2.0, 0.0, float("nan")])
    for enabled, slot, expected in ((True, False, [0.5, 9.0]), (False, True, [9.0, 0.5]), (True, True, [9.0, 0.5]),
                                    (False, False, [9.0, 9.0])):  # fmt: skip
        out = torch.full((2,), 9.0, dtype=torch.float64)
        backend.nonzero_share(grad, out, total=4.0, enabled=torch.tensor(enabled), slot=torch.tensor(slot))
        assert out.tolist() == expected, (enabled, slot)
        backend.nonzero_share(grad, out, enabled=torch.tensor(True), slot=torch.tensor(True), skip=torch.tensor([1.0]))
        assert out.tolist() == expected, "a skipped step writes nothing"


def _closing_and_before(clock, steps: int) -> list[tuple[bool, bool]]:
    """(closes a period, is the last step before a closing one) for each of ``steps`` steps, the clock driven as a
    step drives it (the Triton clock counts a step, and sets the next one's flags, at its end)."""
    flags = []
    rate = torch.ones((), dtype=torch.float64)
    for _ in range(steps):
        closes = clock.advance()
        flags.append((bool(clock.gate) if isinstance(clock, DeviceClock) else closes, bool(clock.before_period_end)))
        if isinstance(clock, KernelDeviceClock):
            tensors = (clock.gate, clock.epoch_gate, clock.epoch, clock.step, clock._lr_history, clock._rolled_back,
                       clock.before_period_end)  # fmt: skip
            counts = (clock.steps_per_epoch, clock.periods.length, clock.periods.last_inner_end, HISTORY_CAPACITY)
            clock_kernels.finish_period(tensors, rate, None, (rate, rate, rate.clone(), rate.clone()), counts)
        else:
            clock.record(rate, None)  # a no-op but at an epoch's end
    return flags


@pytest.mark.parametrize(("steps_per_epoch", "periods"), [(8, 4), (10, 4), (5, 1), (2, 4), (1, 1), (3, 4)])
def test_the_step_before_a_period_end_is_the_same_on_every_clock(steps_per_epoch: int, periods: int) -> None:
    """Over three epochs (a split first one): the step before each closing one is flagged, and no other (a closing
    step never is), on the host clock, the device clock and its Triton form."""
    steps = 3 * steps_per_epoch
    host = _closing_and_before(HostClock(steps_per_epoch, torch.device("cpu"), periods), steps + 1)
    closing = [c for c, _ in host]
    assert [b for _, b in host[:steps]] == [not closing[i] and closing[i + 1] for i in range(steps)]
    assert sum(closing) >= 3
    for kind in (DeviceClock, KernelDeviceClock):
        assert _closing_and_before(kind(steps_per_epoch, torch.device("cpu"), periods), steps + 1) == host


def test_without_an_epoch_length_the_clock_cannot_tell() -> None:
    """With steps_per_epoch=None any step may be the last (end_epoch() closes the epoch)."""
    clock = HostClock(None, torch.device("cpu"), 4)
    clock.advance()
    assert clock.before_period_end is None


def _deep_relu_digits(lr: float, seed: int) -> dict:
    torch.set_num_threads(1)
    return suite.train(suite.Run("deep-relu-digits", "bb", lr, seed))


def test_a_rate_that_kills_a_deep_relu_net_is_rolled_back(monkeypatch) -> None:
    """The robustness suite's 6-hidden-layer ReLU MLP on the digits from η0 = 0.01 (seed 1): without the test the
    search's rates kill the net, which then predicts one class; with it the period is rolled back and the run
    ends near the best tuned reference (96.9 %, benchmarks/results/robustness.md)."""
    with_test = _deep_relu_digits(0.01, 1)
    monkeypatch.setattr(safeguard.SafeguardControl, "DEAD_UNIT_SHARE", 0.0)
    without = _deep_relu_digits(0.01, 1)
    assert without["score"] < 20 and without["rolled_back_epochs"] == []
    assert with_test["score"] > 95 and with_test["rolled_back_epochs"] == [1]


def _relu_net(seed: int = 0, depth: int = 6) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers, width = [], 20
    for _ in range(depth):
        layers += [torch.nn.Linear(width, 32), torch.nn.ReLU()]
        width = 32
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 5))


def _teacher_data(n: int = 640, sparse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 20, generator=generator)
    if sparse:  # most features zero in most samples, as pixels off a digit's strokes
        x = x * (torch.rand(n, 20, generator=generator) < 0.15)
    y = (x @ torch.randn(20, 5, generator=generator)).argmax(1)
    return x, y


def _train(model, opt: BB, batches: list[slice], x, y, epochs: int) -> list[int]:
    """Plain loops; the closing steps' counts of non-zero gradient values (taken here, after each step)."""
    closing_counts = []
    for _ in range(epochs):
        for index, batch in enumerate(batches):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            opt.step(loss=loss)
            if index == len(batches) - 1:
                closing_counts.append(sum(int(torch.count_nonzero(p.grad)) for p in model.parameters()))
    return closing_counts


def test_a_small_last_batch_is_no_dead_unit() -> None:
    """Sparse inputs, batches of 64 and a last batch of one sample: its gradient has under half the non-zero values
    of a full batch's (checked), yet no period is rolled back, because the step before it counts too."""
    x, y = _teacher_data(7 * 64 + 1, sparse=True)
    batches = [slice(i * 64, (i + 1) * 64) for i in range(7)] + [slice(448, 449)]
    model = _relu_net(depth=2)
    opt = BB(model.parameters(), lr=0.05, steps_per_epoch=8, backend="eager")
    first = None

    def first_count(optimizer, args, kwargs) -> None:
        nonlocal first
        if first is None:
            first = sum(int(torch.count_nonzero(p.grad)) for p in model.parameters())

    opt.register_step_pre_hook(first_count)
    closing_counts = _train(model, opt, batches, x, y, epochs=4)
    assert max(closing_counts) < 0.5 * first
    assert opt.rolled_back_epochs == []


def _kill_run(capturable: bool, backend: str, steps: int, share: float | None = None, monkeypatch=None):
    """The deep ReLU net from η0 = 3, which the rule rolls back in its third epoch (10 steps an epoch)."""
    if share is not None:
        monkeypatch.setattr(safeguard.SafeguardControl, "DEAD_UNIT_SHARE", share)
    x, y = _teacher_data()
    model = _relu_net()
    opt = BB(model.parameters(), lr=3.0, steps_per_epoch=10, epochs=3, backend=backend, capturable=capturable)
    batches = [slice(i * 64, (i + 1) * 64) for i in range(10)]
    for step in range(steps):
        batch = batches[step % 10]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        opt.step(loss=loss)
    return model, opt


@pytest.mark.parametrize("backend", ["eager", *(b.name for b in BACKENDS)])
def test_a_captured_run_rolls_back_dead_units_as_the_host_counted_one(backend: str, monkeypatch) -> None:
    """Same weights, rates, rollbacks and shares under the device clock; the rollback is the dead-unit test's (none
    without it)."""
    model, opt = _kill_run(False, backend, 30)
    captured_model, captured = _kill_run(True, backend, 30)
    assert opt.rolled_back_epochs == captured.rolled_back_epochs == [2]
    assert opt.lr_history == captured.lr_history
    for a, b in zip(model.parameters(), captured_model.parameters()):
        assert torch.equal(a, b)
    assert opt.state_dict()["bb"]["live_reference"] == captured.state_dict()["bb"]["live_reference"] > 0
    _, without = _kill_run(False, backend, 30, share=0.0, monkeypatch=monkeypatch)
    assert without.rolled_back_epochs == []


@pytest.mark.parametrize("backend", [b.name for b in BACKENDS])
def test_a_fused_backend_rolls_back_dead_units_as_eager_does(backend: str) -> None:
    """The kill run's three epochs on a fused backend against the eager reference: the same rollback and shares, rates
    and weights as close as the step's rounding leaves them."""
    model, opt = _kill_run(False, "eager", 30)
    fused_model, fused = _kill_run(False, backend, 30)
    assert fused.rolled_back_epochs == opt.rolled_back_epochs == [2]
    assert fused.lr_history == pytest.approx(opt.lr_history, rel=1e-6)
    bb, fused_bb = opt.state_dict()["bb"], fused.state_dict()["bb"]
    assert fused_bb["live_reference"] == bb["live_reference"] and fused_bb["live_rolled_back"] == bb["live_rolled_back"]
    for a, b in zip(model.parameters(), fused_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def _resume_at_step_29(saved: dict, model: torch.nn.Module, capturable: bool) -> BB:
    """A fresh optimizer loaded with ``saved`` that takes the kill run's 30th step (its third epoch's last)."""
    resumed = BB(model.parameters(), lr=3.0, steps_per_epoch=10, epochs=3, backend="eager", capturable=capturable)
    resumed.load_state_dict(saved)
    x, y = _teacher_data()
    batch = slice(9 * 64, 10 * 64)
    resumed.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
    loss.backward()
    resumed.step(loss=loss)
    return resumed


@pytest.mark.parametrize(("saving", "resuming"), [(False, False), (True, False), (False, True)])
def test_a_checkpoint_between_the_two_counts_resumes_exactly(saving: bool, resuming: bool) -> None:
    """Saved after the share of the step before the closing one (in either clock, resumed in either): the resumed run
    rolls back the same period and ends on the same weights. With that share raised in the state dict past half the
    reference the closing period is kept: the loaded share is the one the test reads."""
    model, opt = _kill_run(False, "eager", 30)
    cut_model, cut = _kill_run(saving, "eager", 29)
    saved = copy.deepcopy(cut.state_dict())
    assert 0 < saved["bb"]["live_before"] < 0.5 * saved["bb"]["live_reference"]
    assert saved["bb"]["version"] == checkpoint.VERSION
    raised_model = copy.deepcopy(cut_model)
    resumed = _resume_at_step_29(saved, cut_model, resuming)
    assert resumed.rolled_back_epochs == opt.rolled_back_epochs == [2]
    for a, b in zip(model.parameters(), cut_model.parameters()):
        assert torch.equal(a, b)
    saved["bb"]["live_before"] = saved["bb"]["live_reference"]
    assert _resume_at_step_29(saved, raised_model, resuming).rolled_back_epochs == []


def _shares_now(model: torch.nn.Module) -> float:
    """The share of the model's gradient values that are not zero (every parameter trains)."""
    grads = [p.grad for p in model.parameters()]
    return sum(int(torch.count_nonzero(g)) for g in grads) / sum(g.numel() for g in grads)


def test_without_an_epoch_length_the_test_is_off(monkeypatch) -> None:
    """With steps_per_epoch=None and end_epoch() every 10 steps the kill run goes as it goes without the test (no
    share is taken after the first step's: a read every step would cost a pass over the gradients), where with
    steps_per_epoch=10 the test rolls its third epoch back."""
    assert _kill_run(False, "eager", 30)[1].rolled_back_epochs == [2]
    runs = []
    for share in (safeguard.DEAD_UNIT_SHARE, 0.0):
        monkeypatch.setattr(safeguard.SafeguardControl, "DEAD_UNIT_SHARE", share)
        x, y = _teacher_data()
        model = _relu_net()
        opt = BB(model.parameters(), lr=3.0, steps_per_epoch=None, beta=0.4, epochs=3, backend="eager")
        for step in range(30):
            batch = slice(step % 10 * 64, step % 10 * 64 + 64)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            opt.step(loss=loss)
            if step % 10 == 9:
                opt.end_epoch()
        runs.append((opt.lr_history, opt.rolled_back_epochs, [p.detach().clone() for p in model.parameters()]))
    (history, rolled_back, weights), (history_without, rolled_back_without, weights_without) = runs
    assert history == history_without and rolled_back == rolled_back_without
    assert all(torch.equal(a, b) for a, b in zip(weights, weights_without))


def test_a_step_gradscaler_skips_gives_no_share() -> None:
    """GradScaler's found_inf set (and every gradient value made non-zero, so that a share taken would be 1): the
    first step gives no reference, a skipped closing step no share (the step before it stands for the period), and a
    period whose two steps were both skipped keeps the reference."""
    x, y = _teacher_data(192)
    model = _relu_net(depth=2)
    opt = BB(model.parameters(), lr=0.01, steps_per_epoch=8, backend="eager")  # first epoch: periods of 2 steps
    shares, references = [], []
    for step in range(6):
        batch = slice(step * 32, step * 32 + 32)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        skipped = step in (0, 3, 4, 5)
        if skipped:
            for p in model.parameters():
                p.grad.fill_(1.0)
        shares.append(_shares_now(model))
        opt.grad_scale = torch.ones((), dtype=torch.float32)  # as torch.amp.GradScaler sets them around step()
        opt.found_inf = torch.tensor([1.0 if skipped else 0.0])
        opt.step()
        del opt.grad_scale, opt.found_inf
        references.append(opt.state_dict()["bb"]["live_reference"])
    assert shares[0] == 1.0 and shares[1] < 1.0 and shares[2] < 1.0
    assert references[0] is None
    assert references[1] == pytest.approx(shares[1], rel=1e-12)  # the first period's end: its closing step's share
    assert references[3] == pytest.approx(shares[2], rel=1e-12)  # its closing step skipped: the step before stands
    assert references[5] == references[3]  # both steps skipped: no share, the reference stays
    assert opt.rolled_back_epochs == []


def test_adding_a_group_drops_the_reference() -> None:
    """add_param_group changes the share's denominator: no reference until the next good period end."""
    x, y = _teacher_data(64)
    model = _relu_net(depth=2)
    layers = list(model.children())
    opt = BB([p for layer in layers[:-1] for p in layer.parameters()], lr=0.01, steps_per_epoch=4, backend="eager")
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
    opt.step()
    assert opt.state_dict()["bb"]["live_reference"] is not None
    opt.add_param_group({"params": list(layers[-1].parameters())})
    assert opt.state_dict()["bb"]["live_reference"] is None
    shares = []
    for step in range(3):  # steps 2 to 4 of T = 4: the epoch's end closes a good period
        opt.zero_grad()
        torch.nn.functional.cross_entropy(
            model(x[16 * step : 16 * step + 16]), y[16 * step : 16 * step + 16]
        ).backward()
        shares.append(_shares_now(model))
        opt.step()
    assert opt.rolled_back_epochs == []
    # The period's share: the larger of its last step's and the step's before it.
    assert opt.state_dict()["bb"]["live_reference"] == pytest.approx(max(shares[1:]), rel=1e-12)


def test_a_version_4_state_dict_has_no_reference_until_a_good_period_end() -> None:
    """An entry saved before the shares existed loads with none: the test cannot fire until a good period end."""
    _, opt = _kill_run(False, "eager", 15)
    saved = copy.deepcopy(opt.state_dict())
    for bb in [saved["bb"], *(group["bb"] for group in saved["param_groups"])]:
        for key in ("live_reference", "live_before"):
            bb.pop(key, None)  # one dict, shared by the top-level entry and the groups
        bb["version"] = 4
    fresh = BB(_relu_net().parameters(), lr=3.0, steps_per_epoch=10, epochs=3, backend="eager")
    fresh.load_state_dict(saved)
    state = fresh.state_dict()["bb"]
    assert state["version"] == checkpoint.VERSION and state["live_reference"] is None
    assert state["live_before"] == 0.0


class _TwoHeads(torch.nn.Module):
    """A small trunk with a small head and a large one: the large head holds 94 % of the values."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Sequential(torch.nn.Linear(20, 8), torch.nn.ReLU())
        self.head = torch.nn.Linear(8, 5)
        self.aux = torch.nn.Linear(8, 400)


def _drop_the_large_head(set_to_none: bool, backend: str = "eager", scaled: bool = False) -> BB:
    """Epoch 0 trains both heads (an auxiliary loss on the large one); from epoch 1 on the large head is never
    reached by backward, as an unused branch or expert is not. ``scaled``: each step as under GradScaler, which
    writes every gradient in place (unscale_) and hands the optimizer its scale and found_inf."""
    x, y = _teacher_data()
    aux_target = torch.randn(len(x), 400, generator=torch.Generator().manual_seed(1))
    model = _TwoHeads()
    # tau_max keeps the rate where no loss test rolls a period back, so that only the dead-unit test may.
    opt = BB(model.parameters(), lr=0.05, steps_per_epoch=10, epochs=4, tau_max=0.5, backend=backend)
    for epoch in range(4):
        for step in range(10):
            batch = slice(step * 64, step * 64 + 64)
            opt.zero_grad(set_to_none=set_to_none)
            features = model.trunk(x[batch])
            loss = torch.nn.functional.cross_entropy(model.head(features), y[batch])
            if epoch == 0:
                loss = loss + 0.1 * torch.nn.functional.mse_loss(model.aux(features), aux_target[batch])
            loss.backward()
            if scaled:
                for p in model.parameters():
                    p.grad.mul_(1.0)
                opt.grad_scale, opt.found_inf = torch.ones(()), torch.zeros(1)
            opt.step(loss=loss)
            if scaled:
                del opt.grad_scale, opt.found_inf
    return opt


@pytest.mark.parametrize("backend", ["eager", *(b.name for b in BACKENDS)])
def test_a_branch_backward_stops_reaching_is_no_dead_unit(backend: str) -> None:
    """With zero_grad(set_to_none=True) (the default) the large head has no gradient from epoch 1 on and is left out
    of the share, so nothing is rolled back; with set_to_none=False its zeroed gradients count as values that are
    zero, and the share falls to about 6 % of the reference: one period is rolled back, then the next is kept."""
    assert _drop_the_large_head(True, backend).rolled_back_epochs == []
    assert _drop_the_large_head(False, backend).rolled_back_epochs == [1]


def test_under_gradscaler_an_in_place_write_is_no_gradient_for_the_share() -> None:
    """GradScaler writes every gradient in place, so only backward and assignment count (as for the step): the large
    head that backward stopped reaching stays out of the share, and nothing is rolled back."""
    assert _drop_the_large_head(True, scaled=True).rolled_back_epochs == []
