"""The default control's period-end decision as a Triton program (bbfused/control/safeguard_kernel.py) gives the
bits of its torch ops (SafeguardControl.diverged / next_rate / close_epoch), on random states with NaN, inf,
ties and missing losses, under the host clock and the device clock (gate set and not), through the interpreter."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

pytest.importorskip("triton")

from bbfused.backends.base import write_share  # noqa: E402
from bbfused.clock import DeviceClock, HostClock  # noqa: E402
from bbfused.control.preconditioned import PreconditionedControl  # noqa: E402
from bbfused.control.safeguard import SafeguardControl  # noqa: E402

DEVICE = torch.device("cpu")
# Shared values make ties and the policy's ratios (x2.5, x4, x0.7 ...) come up, not only generic floats.
POOL = [
    math.nan,
    math.inf,
    -math.inf,
    0.0,
    1e-3,
    0.05,
    0.5,
    0.95,
    1.0,
    1.1,
    2.0,
    2.5,
    4.0,
    10.0,
    1e3,
    1e300,
    -0.5,
    -1.0,
    -2.0,
]
STATE = ("rate", "ceiling", "snapshot_sq_norm", "lr_cap", "good_lr", "initial_loss", "best_loss", "last_loss",
         "snapshot_loss")  # fmt: skip
FLAGS = ("searching", "has_snapshot", "loss_rollback")


# Shares of gradient values that are not zero: ties with half the reference (1.0 or 0.1) and none at all.
SHARES = [0.0, 0.04, 0.05, 0.49, 0.5, 1.0]


class FakeBuffers:
    """The EpochBuffers a control sees: the measured sums and the share of gradient values that are not zero at the
    closing step; the commit pass records its flag."""

    def __init__(self, sums: torch.Tensor, use_kernels: bool, share: float = 1.0) -> None:
        self.sums, self.use_kernels, self.committed = sums, use_kernels, None
        self.share = torch.tensor(share, dtype=torch.float64)
        self.backends: dict = {}

    def measure(self, clock, partials: bool = False) -> torch.Tensor:
        return self.sums

    def nonzero_gradient_share(self, out, enabled=None, slot=None, skip=None) -> None:
        write_share(self.share, out, False, enabled, 1.0, slot, skip)

    def commit(self, rolled_back: torch.Tensor, clock) -> None:
        self.committed = rolled_back.clone()

    def kernel_device(self) -> torch.device | None:
        return DEVICE if self.use_kernels else None


def number(rng: random.Random, positive: bool = False) -> float:
    value = rng.choice(POOL) if rng.random() < 0.7 else rng.lognormvariate(0, 2)
    return abs(value) if positive and not math.isnan(value) else value


def random_control(rng: random.Random, clock, epochs: int | None) -> SafeguardControl:
    # The preconditioned control's constants (a first epoch's rise counted from 0 %) go through the kernels too.
    kind = rng.choice([SafeguardControl, PreconditionedControl])
    control = kind(clock, DEVICE, numel=rng.choice([10, 1000]), lr=number(rng, True), epochs=epochs)
    for name in STATE:
        getattr(control, name).fill_(number(rng))
    for name in FLAGS:
        getattr(control, name).fill_(rng.random() < 0.5)
    if control.gradient_shares is not None:
        control.gradient_shares.reference.fill_(rng.choice([math.nan, 0.0, 0.1, 1.0]))
        control.gradient_shares.before_end.fill_(rng.choice(SHARES[:5]))
        control.gradient_shares.rolled_back.fill_(rng.random() < 0.3)
    return control


def shares_of(control: SafeguardControl) -> list[torch.Tensor]:
    shares = control.gradient_shares
    return [] if shares is None else [shares.reference, shares.before_end, shares.closing, shares.rolled_back]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values and dtype, NaN equal to NaN."""
    if a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def small_rise(control: SafeguardControl, rng: random.Random) -> float:
    """Set the last good period's mean loss to 1 and return a loss 5 % above it: a rise that brakes the preconditioned
    control in the first epoch once the loss has left its start (here half the time) and the SGD control only after
    the first epoch."""
    control.last_loss.fill_(1.0)
    control.initial_loss.fill_(rng.choice([1.02, 3.0]))
    control.loss_rollback.fill_(False)
    return 1.05


def host_case(rng: random.Random) -> tuple[SafeguardControl, HostClock, torch.Tensor, tuple[float, float]]:
    T = rng.choice([8, 10])
    clock = HostClock(T, DEVICE, first_epoch_periods=rng.choice([1, 4]))
    clock.epoch = rng.choice([0, 0, 1, 5])
    if clock.epoch == 0 and clock.periods.length:
        clock.step_in_epoch = rng.choice([clock.periods.length, T])
    else:
        clock.step_in_epoch = T
    control = random_control(rng, clock, rng.choice([None, 6]))
    steps = rng.choice([0, clock.closing_steps, clock.closing_steps, 3])
    # A third of the periods have barely left the first step's loss (the search goes on past epoch 0 then).
    near = None
    if rng.random() < 0.33:
        control.initial_loss.fill_(2.3)
        control.searching.fill_(True)
        near = 2.3 * rng.choice([0.99, 0.9])
    elif rng.random() < 0.3:
        near = small_rise(control, rng)
    for _ in range(steps):
        control.add_loss(torch.tensor(number(rng) if near is None else near, dtype=torch.float64))
    return control, clock, torch.tensor([number(rng) for _ in range(4)], dtype=torch.float64), (1e-4, 100.0)


def device_case(rng: random.Random) -> tuple[SafeguardControl, DeviceClock, torch.Tensor, tuple[float, float]]:
    T = rng.choice([8, 10])
    clock = DeviceClock(T, DEVICE, first_epoch_periods=rng.choice([1, 4]))
    clock.epoch.fill_(rng.choice([0, 0, 1, 5, 9]))
    clock.step.fill_(rng.choice([1, 2, 4, 5, 8, T]))
    clock.epoch_gate.fill_(int(clock.step) == T)
    clock.gate.fill_(rng.random() < 0.8)
    control = random_control(rng, clock, rng.choice([None, 6]))
    control.loss.steps.fill_(rng.choice([0.0, 2.0, 4.0, float(T)]))
    if rng.random() < 0.33:
        control.initial_loss.fill_(2.3)
        control.searching.fill_(True)
        control.loss.sum.fill_(2.3 * rng.choice([0.99, 0.9]) * float(control.loss.steps))
    elif rng.random() < 0.3:
        control.loss.sum.fill_(small_rise(control, rng) * float(control.loss.steps))
    else:
        control.loss.sum.fill_(number(rng))
    control.loss.last.fill_(number(rng))
    control.loss.before_last.fill_(math.nan if rng.random() < 0.25 else number(rng))
    return control, clock, torch.tensor([number(rng) for _ in range(4)], dtype=torch.float64), (0.01, 10.0)


def close_both(control, clock, sums, bounds, share: float = 1.0):
    """The closing step's step_taken (``share``: its gradient values' share that is not zero) and close_epoch on two
    copies, by the torch ops and by the kernels; both copies and results."""
    results = []
    for use_kernels in (False, True):
        c, k = copy.deepcopy((control, clock))
        buffers = FakeBuffers(sums.clone(), use_kernels, share)
        c.step_taken(buffers, k, closes=True)
        applied, diverged = c.close_epoch(buffers, torch.tensor(1.0, dtype=torch.float64), k, (None, *bounds))
        results.append((c, applied, diverged, buffers.committed))
    return results


@pytest.mark.parametrize("make_case", [host_case, device_case], ids=["host clock", "device clock"])
def test_kernel_decision_is_the_torch_decision_bit_for_bit(make_case):
    rng = random.Random(0)
    outcomes = set()
    for trial in range(120):
        control, clock, sums, bounds = make_case(rng)
        share = rng.choice(SHARES)
        (torch_c, torch_rate, torch_div, torch_commit), (kern_c, kern_rate, kern_div, kern_commit) = close_both(
            control, clock, sums, bounds, share
        )
        context = f"trial {trial}: sums {sums.tolist()}"
        assert same(torch_rate, kern_rate), f"{context}: rate {torch_rate} vs {kern_rate}"
        assert bool(torch_div) == bool(kern_div), context
        assert bool(torch_commit) == bool(kern_commit), context
        for name in STATE + FLAGS:
            assert same(getattr(torch_c, name), getattr(kern_c, name)), (
                f"{context}: {name} {getattr(torch_c, name)} vs {getattr(kern_c, name)}"
            )
        for name in ("sum", "last", "before_last"):
            assert same(getattr(torch_c.loss, name), getattr(kern_c.loss, name)), f"{context}: loss.{name}"
        assert int(torch_c.loss.steps_tensor()) == int(kern_c.loss.steps_tensor()), context
        for torch_share, kernel_share in zip(shares_of(torch_c), shares_of(kern_c), strict=True):
            assert same(torch_share, kernel_share), f"{context}: shares {torch_share} vs {kernel_share}"
        outcomes.add((bool(torch_div), bool(torch_c.searching), bool(torch_rate.isfinite())))
    # The random states reached both verdicts, both search states and finite rates (the comparison was not vacuous).
    assert {(True, False), (False, True), (False, False)} <= {o[:2] for o in outcomes}


def close_first_epoch_period(
    clock_kind: str, kind, initial: float, last: float, mean: float
) -> tuple[torch.Tensor, bool]:
    """Close a first-epoch period of mean loss ``mean`` after a good one of mean ``last`` (also the best so far), by the
    torch ops and by the kernels; both must give the same rate, ceiling and verdict, which are returned (the rate
    and whether the period was rolled back)."""
    if clock_kind == "host":
        clock = HostClock(8, DEVICE, first_epoch_periods=4)
        clock.step_in_epoch = clock.periods.length
    else:
        clock = DeviceClock(8, DEVICE, first_epoch_periods=4)
        clock.step.fill_(clock.periods.length)
        clock.gate.fill_(True)
    control = kind(clock, DEVICE, numel=10, lr=0.01, epochs=None)
    for name, value in (("initial_loss", initial), ("best_loss", last), ("last_loss", last), ("snapshot_loss", last)):
        getattr(control, name).fill_(value)
    control.has_snapshot.fill_(True)
    control.snapshot_sq_norm.fill_(1.0)
    if clock_kind == "host":
        for _ in range(clock.closing_steps):
            control.add_loss(torch.tensor(mean, dtype=torch.float64))
    else:  # the device meter's state, as device_case sets it
        control.loss.sum.fill_(mean * clock.periods.length)
        control.loss.steps.fill_(float(clock.periods.length))
        control.loss.last.fill_(mean)
        control.loss.before_last.fill_(mean)
    sums = torch.tensor([1e-6, 1e-6, 1.0, 1e-3], dtype=torch.float64)  # an estimate of 0.5: above the rate
    (torch_c, torch_rate, torch_div, _), (kern_c, kern_rate, kern_div, _) = close_both(
        control, clock, sums, (1e-4, 100.0)
    )
    assert same(torch_rate, kern_rate) and same(torch_c.ceiling, kern_c.ceiling)
    assert bool(torch_div) == bool(kern_div)
    return torch_rate, bool(torch_div)


@pytest.mark.parametrize("clock_kind", ["host", "device"])
@pytest.mark.parametrize("kind", [SafeguardControl, PreconditionedControl])
@pytest.mark.parametrize("initial", [1.02, 3.0], ids=["on its start", "after progress"])
def test_kernel_counts_a_first_epoch_rise_like_torch(clock_kind: str, kind, initial: float) -> None:
    """A first-epoch period whose mean rose 5 % above the last one's (1.0, also the best so far): the kernels brake
    where the torch decision does, which is only the preconditioned control's, once the best mean is below 0.95 times
    the first step's loss."""
    rate, _ = close_first_epoch_period(clock_kind, kind, initial, last=1.0, mean=1.05)
    braked = kind is PreconditionedControl and initial == 3.0
    assert float(rate) == pytest.approx(0.005 if braked else 0.01 * kind.SEARCH_LIMIT)  # halved, or searching


@pytest.mark.parametrize("clock_kind", ["host", "device"])
@pytest.mark.parametrize("kind", [SafeguardControl, PreconditionedControl])
def test_kernel_rolls_back_a_first_epoch_rise_like_torch(clock_kind: str, kind) -> None:
    """A first-epoch period whose mean rose 15 % (past the first epoch's 10 % tolerance, under the later 25 %): the
    SGD control rolls it back while the loss is near its start (the first step's 1.02), the preconditioned one
    brakes, and after progress (a first loss of 3) both brake; the kernels decide as the torch ops do. The rise,
    0.15, is past the loss margin (5 % of the first step's loss)."""
    for initial in (1.02, 3.0):
        rate, rolled_back = close_first_epoch_period(clock_kind, kind, initial, last=1.0, mean=1.15)
        assert rolled_back == (kind is SafeguardControl and initial == 1.02)
        if not rolled_back:
            assert float(rate) == pytest.approx(0.005)  # braked: halved


@pytest.mark.parametrize("clock_kind", ["host", "device"])
@pytest.mark.parametrize("kind", [SafeguardControl, PreconditionedControl])
@pytest.mark.parametrize(
    ("initial", "best", "mean", "braked"),
    [
        (-1.0, -2.0, -2.1, False),
        (-1.0, -2.0, -1.9, False),
        (-1.0, -2.0, -1.7, True),
        (0.0, 0.0, 1e-3, True),
        # torch's bound for -2.0 (-2 times float32's 2 - 1.1), and the next double above it.
        (-1.0, -2.0, -1.7999999523162842, False),
        (-1.0, -2.0, math.nextafter(-1.7999999523162842, 0.0), True),
    ],
    ids=["a fall", "a 5 % rise", "a 15 % rise", "a rise from zero", "at the bound", "just past the bound"],
)
def test_a_non_positive_loss_rises_by_its_size(
    clock_kind: str, kind, initial: float, best: float, mean: float, braked: bool
) -> None:
    """With non-positive losses the first epoch's rise tolerance is a fraction of the last mean's size: a fall, or a
    rise within the SGD control's 10 %, goes on searching; a larger rise brakes (the kernels as the torch ops, to the
    bound's last bit). A first loss of -1 sets no progress mark: the preconditioned control's 5 % rise is measured
    with the 10 % tolerance, not its tolerance after progress (0), although the best mean (-2) is below 0.95 · -1."""
    rate, _ = close_first_epoch_period(clock_kind, kind, initial, last=best, mean=mean)
    assert float(rate) == pytest.approx(0.005 if braked else 0.01 * kind.SEARCH_LIMIT)


def close_good_period(
    clock_kind: str, reference: float, before: float, share: float, other_rollback: bool = False, again: bool = False
):
    """Close a period of epoch 1 that every other test passes (the mean loss fell from 1.0 to 0.9), with the dead-unit
    test's ``reference``, the share at the step ``before`` the closing one and the closing step's ``share``, or (with
    ``other_rollback``) one whose mean rose 50 %, which the rise test rolls back (``again``: the period before was
    rolled back by the dead-unit test); by the torch ops and by the kernels, which must agree to the bit. Returns the
    torch copy of the control, its applied rate and its verdict."""
    if clock_kind == "host":
        clock = HostClock(8, DEVICE, first_epoch_periods=4)
        clock.epoch, clock.step_in_epoch = 1, 8
    else:
        clock = DeviceClock(8, DEVICE, first_epoch_periods=4)
        clock.epoch.fill_(1)
        clock.step.fill_(8)
        clock.epoch_gate.fill_(True)
        clock.gate.fill_(True)
    control = SafeguardControl(clock, DEVICE, numel=10, lr=0.1, epochs=None)
    for name, value in (("initial_loss", 2.3), ("best_loss", 1.0), ("last_loss", 1.0), ("snapshot_loss", 1.0),
                        ("good_lr", 0.1), ("snapshot_sq_norm", 1.0)):  # fmt: skip
        getattr(control, name).fill_(value)
    control.has_snapshot.fill_(True)
    control.searching.fill_(False)
    control.gradient_shares.load(reference, before, again)
    mean = 1.5 if other_rollback else 0.9
    if clock_kind == "host":
        for _ in range(8):
            control.add_loss(torch.tensor(mean, dtype=torch.float64))
    else:
        control.loss.sum.fill_(mean * 8)
        control.loss.steps.fill_(8.0)
        control.loss.last.fill_(mean)
        control.loss.before_last.fill_(mean)
    sums = torch.tensor([8e-6, 1e-6, 1.0, 1e-3], dtype=torch.float64)  # an estimate of 1: the rate doubles
    (torch_c, torch_rate, torch_div, torch_commit), (kern_c, kern_rate, kern_div, kern_commit) = close_both(
        control, clock, sums, (1e-4, 100.0), share
    )
    assert same(torch_rate, kern_rate) and bool(torch_div) == bool(kern_div) == bool(torch_commit)
    for name in STATE + FLAGS:
        assert same(getattr(torch_c, name), getattr(kern_c, name)), name
    for torch_share, kernel_share in zip(shares_of(torch_c), shares_of(kern_c), strict=True):
        assert same(torch_share, kernel_share)
    return torch_c, float(torch_rate), bool(torch_div)


@pytest.mark.parametrize("clock_kind", ["host", "device"])
@pytest.mark.parametrize(
    ("reference", "before", "share", "dead"),
    [
        (0.8, 0.0, 0.8, False),
        (0.8, 0.0, 0.39, True),
        (0.8, 0.0, 0.4, False),  # exactly half: not under it
        (0.8, 0.5, 0.1, False),  # the step before the closing one (a full batch) still reaches the units
        (0.8, 0.39, 0.1, True),
        (0.8, 0.0, 0.0, False),  # no value at all: a stationary point (or every count skipped)
        (math.nan, 0.0, 0.1, False),  # no reference yet
    ],
    ids=["kept", "under half", "at half", "before the end", "both under half", "none at all", "no reference"],
)
def test_a_good_period_whose_gradient_share_collapsed_is_rolled_back(
    clock_kind: str, reference: float, before: float, share: float, dead: bool
) -> None:
    """The dead-unit test: a period every other test passes is rolled back when the largest of its last steps' shares
    of gradient values that are not zero fell under half the last good period end's, as a non-finite average is (the
    rate becomes the last good one, capped at a quarter of its own, and stays capped); else that share becomes the
    reference, unless it has none. Either way the next period starts with no share of its own."""
    control, rate, diverged = close_good_period(clock_kind, reference, before, share)
    shares = control.gradient_shares
    assert diverged == dead == bool(shares.rolled_back)
    assert shares.period.tolist() == [0.0, 0.0]
    if dead:
        assert rate == pytest.approx(0.025) and float(control.lr_cap) == pytest.approx(0.025)
        assert float(shares.reference) == reference and not bool(control.loss_rollback)
        assert float(control.best_loss) == 1.0  # the rolled-back period's mean is not a best
    else:
        assert rate == pytest.approx(0.2) and math.isinf(float(control.lr_cap))
        assert float(control.best_loss) == pytest.approx(0.9)
        live = max(before, share)
        assert same(shares.reference, torch.tensor(live if live > 0 else reference, dtype=torch.float64))


@pytest.mark.parametrize("clock_kind", ["host", "device"])
def test_the_dead_unit_test_leaves_another_rollback_as_it_is(clock_kind: str) -> None:
    """A period the rise test rolls back returns to the last good rate under the rise's ceiling (0.7 times its own) and
    is not capped for good, whatever its share: the dead-unit test does not turn it into a divergence."""
    control, rate, diverged = close_good_period(clock_kind, 0.8, 0.0, 0.1, other_rollback=True)
    assert diverged and rate == pytest.approx(0.07) and math.isinf(float(control.lr_cap))
    assert float(control.gradient_shares.reference) == 0.8


@pytest.mark.parametrize("clock_kind", ["host", "device"])
def test_a_second_collapse_in_a_row_is_kept(clock_kind: str) -> None:
    """Right after a dead-unit rollback a period whose share is still under half is kept and its share becomes the
    reference: the rollback did not bring the share back, so rolling back every period after it would stop the run."""
    control, rate, diverged = close_good_period(clock_kind, 0.8, 0.0, 0.3, again=True)
    shares = control.gradient_shares
    assert not diverged and rate == pytest.approx(0.2) and math.isinf(float(control.lr_cap))
    assert float(shares.reference) == 0.3 and not bool(shares.rolled_back)
    control, _, diverged = close_good_period(clock_kind, 0.8, 0.0, 0.3)
    assert diverged and bool(control.gradient_shares.rolled_back)


def test_the_preconditioned_control_has_no_dead_unit_test() -> None:
    """The Adam-scaled policy neither counts nor keeps shares in its state."""
    clock = HostClock(8, DEVICE)
    control = PreconditionedControl(clock, DEVICE, numel=10, lr=1e-3, epochs=None)
    assert control.gradient_shares is None
    state = control.state(0)
    assert state.live_reference is None and state.live_before == 0.0
