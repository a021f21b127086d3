"""The paper experiments (benchmarks/paper/) in quick mode, and the failure modes they found in BB.

Failure modes, each with a regression test of BB's safeguard (paper-exact BB is ``safeguard=False``):

* η0 too large for epochs 0 and 1, where the rule cannot act yet: η0 = 1 turns the paper's MLP into NaN
  within epoch 0 on MNIST (the full-data grid of experiment 1).
* A finite blow-up: the weights explode without becoming NaN in the epoch, so a check for NaN alone would
  keep the exploded point as the one to return to (η0 = 1 on a few hundred MNIST images).
* A rate the rule itself chose diverges at k >= 1 (the bounds allow up to τ_max/(k+2) = 1 at k = 1).
* A rate that kills the network without any NaN: the rule's fallback 1/3 at k = 1 sends LeNet-5 on MNIST to
  a constant prediction (loss ln 10 from then on) while ‖θ‖² grows 85-fold (244 to 2.1e4) in that epoch.
* η0 = 1 kills LeNet-5 within epoch 0 with ‖θ‖² growing only 7.3-fold (under the first, 10-fold threshold);
  LeNet-5 weights start at RMS 0.06, under the first floor (RMS 0.1), so the growth was not even counted.
* The same rate diverging again and again: after a rollback the rule came back to rates near the one that
  diverged (LeNet-5, seed 1: rollbacks at k = 2 and 4, then a death at 0.134); its rates are now capped.
* A rate that wrecks a BatchNorm network without growing its weights (scale-invariant): the rule's 1/3 at k = 1
  raised ResNet-18's loss up to 26-fold on MNIST with ‖θ‖² unchanged. Caught by the loss check (each step's loss
  given to ``step``); the training command restores BatchNorm's running statistics with the weights.
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torchrun import END_OF_RANK, run_two_ranks

from bbfused import BB, checkpoint
from bbfused.control import safeguard as safeguard_control
from bbfused.train import UsageError, format_record, parse_args, prepare

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "benchmarks" / "paper"
sys.path.insert(0, str(PAPER))

import compare  # noqa: E402
import report  # noqa: E402
import sensitivity  # noqa: E402
from runs import param_sq_norm  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The safeguard is torch ops around the backends' epoch end: checked with each backend that runs on DEVICE.
BACKENDS = ["eager", "triton"] + (["cpp"] if DEVICE.type == "cpu" else [])


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: the MNIST runs here stay quick on a CPU that other processes share."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quadratic_epochs(opt: BB, theta: torch.nn.Parameter, epochs: int, steps: int) -> list[torch.Tensor]:
    """Train f(θ) = ½‖θ‖² (gradient θ: a rate η multiplies θ by 1 − η each step); θ after each epoch."""
    after = []
    for _ in range(epochs * steps):
        opt.zero_grad()
        (0.5 * theta.square().sum()).backward()
        opt.step()
        if opt.step_in_epoch == 0:
            after.append(theta.detach().clone())
    return after


def quadratic_bb(lr: float, safeguard: bool, backend: str = "eager", **kwargs) -> tuple[BB, torch.nn.Parameter]:
    theta = torch.nn.Parameter(torch.ones(16, device=DEVICE))
    return BB([theta], lr=lr, steps_per_epoch=10, backend=backend, safeguard=safeguard, **kwargs), theta


def pinned_bb(backend: str = "eager") -> tuple[BB, torch.nn.Parameter]:
    """The default control held at 0.1 by tau_max (a rising loss or a rollback still lowers it), without momentum:
    θ shrinks by 0.9 each step, so only the losses given to ``step`` decide (the search cannot overshoot)."""
    return quadratic_bb(0.1, True, backend, momentum=0.0, tau_max=0.1)


# The first epoch's rate periods (10 steps): two steps each, the default control acting at the end of each.
PERIOD = max(2, 10 // safeguard_control.FIRST_EPOCH_PERIODS)


def quadratic_steps(opt: BB, theta: torch.nn.Parameter, steps: int) -> torch.Tensor:
    """``steps`` steps on ½‖θ‖²; θ after them."""
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * theta.square().sum()).backward()
        opt.step()
    return theta.detach().clone()


def mnist_run(lr: float, safeguard: bool, *options: str, model: str = "mlp"):
    flag = "--bb-safeguard" if safeguard else "--no-bb-safeguard"
    argv = ["--model", model, "--lr", str(lr), "--device", "cpu", "--limit-test", "1000", flag, *options]
    return prepare(parse_args([*argv, "--print-freq", "1000"]))


def watch_first_period(run) -> list[tuple[list[torch.Tensor], float]]:
    """A list that gets the weights and the rate right after the first period of ``run``'s first epoch ends."""
    optimizer = run.optimizer
    period = max(2, optimizer.steps_per_epoch // safeguard_control.FIRST_EPOCH_PERIODS)
    first_period = []
    step = optimizer.step

    def watched_step(*args, **kwargs):
        result = step(*args, **kwargs)
        if optimizer.epoch == 0 and optimizer.step_in_epoch == period:
            first_period.append(([p.detach().clone() for p in run.model.parameters()], optimizer.lr))
        return result

    optimizer.step = watched_step
    return first_period


# ============================================================================================ failure modes
def test_initial_lr_too_large_nan_in_epoch_0_is_rolled_back() -> None:
    """η0 = 1 on the paper's MLP (4096 MNIST images, 32 steps an epoch): the paper's BB ends epoch 0 with
    NaN weights; the default (given the paper's update: no momentum) rolls its first period (8 steps) back to the
    initial weights exactly, goes on at a tenth of the rate, its later rates capped at a quarter of 1, and learns."""
    paper = mnist_run(1.0, False, "--limit-train", "4096")
    record = paper.run_epoch(0)
    assert math.isnan(record["train_loss"])
    assert not all(torch.isfinite(p).all() for p in paper.model.parameters())

    safe = mnist_run(1.0, True, "--limit-train", "4096", "--momentum", "0")
    optimizer = safe.optimizer
    initial = [p.detach().clone() for p in safe.model.parameters()]
    first_period = watch_first_period(safe)
    records = [safe.run_epoch(epoch) for epoch in (0, 1, 2)]
    ((weights, rate),) = first_period
    assert all(torch.equal(p, q) for p, q in zip(weights, initial)) and rate == pytest.approx(0.1)
    assert records[0]["rolled_back"] and optimizer.rolled_back_epochs == [0]
    assert max(optimizer.lr_history) <= safeguard_control.CAP * 1.0
    assert records[1]["train_loss"] < 2.0 and records[2]["train_loss"] < records[1]["train_loss"]
    assert records[2]["test_acc1"] > 85.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_blow_up_counts_as_diverged(backend: str) -> None:
    """η = 3 on ½‖θ‖² multiplies θ by −2 each step: after 10 steps ‖θ‖² grew 4^10-fold and is still finite."""
    paper, theta = quadratic_bb(3.0, safeguard=False)
    (after,) = quadratic_epochs(paper, theta, 1, 10)
    assert torch.isfinite(after).all() and after.square().sum() > 1e6

    # The default (without momentum, whose first steps are short) sees ‖θ‖² grow 16-fold in the first period.
    safe, theta = quadratic_bb(3.0, safeguard=True, backend=backend, momentum=0.0)
    first = quadratic_steps(safe, theta, PERIOD)
    assert torch.equal(first, torch.ones(16, device=DEVICE))  # rolled back to the first step's point
    assert safe.lr == pytest.approx(0.3)  # a tenth of the rate that diverged
    assert safe.rolled_back_epochs == [0] and paper.rolled_back_epochs == []
    after = quadratic_epochs(safe, theta, 3, 10)[:2] + [quadratic_steps(safe, theta, PERIOD)]
    # Every later rate is under a quarter of 3 (the cap), where θ only shrinks: it converges.
    assert max(safe.lr_history) <= 3.0 * safeguard_control.CAP and safe.rolled_back_epochs == [0]
    assert 1.0 > float(after[0].abs().max()) > float(after[1].abs().max()) > float(after[2].abs().max())


def test_lenet_dying_in_epoch_0_without_nan_is_rolled_back() -> None:
    """η0 = 1 on LeNet-5 (all of MNIST, as in experiment 3): the paper's BB ends epoch 0 with a dead network
    (the epoch's mean loss at or above ln 10, 10 % accuracy, finite weights) whose ‖θ‖² grew past the 4-fold growth
    limit (7.3-fold and 11.4-fold with two torch 2.14.1 builds, and a mean loss from 2.30 to 2.40 on two CPUs: the
    dying run is chaotic); the safeguard rolls it back to the initial weights exactly and epoch 1 at 0.1 learns."""
    paper = mnist_run(1.0, False, model="lenet")
    initial_sq_norm = param_sq_norm(paper.model)
    record = paper.run_epoch(0)
    assert record["train_loss"] > math.log(10) - 0.05 and record["test_acc1"] < 15.0
    assert all(torch.isfinite(p).all() for p in paper.model.parameters())
    assert param_sq_norm(paper.model) / initial_sq_norm > safeguard_control.WEIGHT_GROWTH  # the weight test catches it

    # The default with the paper's update (no momentum): its first period (a quarter of the epoch) is rolled back
    # to the initial weights exactly, and the rest of the epoch at a tenth of the rate learns.
    safe = mnist_run(1.0, True, "--momentum", "0", model="lenet")
    optimizer = safe.optimizer
    initial = [p.detach().clone() for p in safe.model.parameters()]
    first_period = watch_first_period(safe)
    safe_record = safe.run_epoch(0)
    ((weights, rate),) = first_period
    assert all(torch.equal(p, q) for p, q in zip(weights, initial)) and rate == pytest.approx(0.1)
    assert safe_record["rolled_back"] and "diverged: BB rolled the epoch back" in format_record(safe_record, 10)
    next_record = safe.run_epoch(1)
    assert next_record["test_acc1"] > 90.0 and not next_record["rolled_back"]
    assert optimizer.rolled_back_epochs == [0] and max(optimizer.lr_history) <= safeguard_control.CAP * 1.0


@pytest.mark.parametrize(("lr", "rolled_back"), [(2.41, False), (2.42, True)])
def test_growth_threshold_is_fourfold(lr: float, rolled_back: bool) -> None:
    """|1 − η|^4 is ‖θ‖²'s growth over the first period (two steps, no momentum): 3.95-fold at η = 2.41 is kept,
    4.07-fold at 2.42 is rolled back (healthy epochs measured up to 2.5-fold, LeNet-5 dying 7.3- and 9.9-fold)."""
    safe, theta = quadratic_bb(lr, safeguard=True, momentum=0.0)
    after = quadratic_steps(safe, theta, PERIOD)
    assert torch.equal(after, torch.ones(16, device=DEVICE)) == rolled_back
    assert safe.lr == pytest.approx(lr / 10 if rolled_back else lr)  # no estimate after the first period: kept


@pytest.mark.parametrize(("target", "rolled_back"), [(0.099, False), (0.101, True)])
def test_growth_from_zero_weights_counts_above_rms_0_1(target: float, rolled_back: bool) -> None:
    """Weights that start at zero may grow to an RMS of 0.1 in an epoch (the floor: 4 x 0.0025 per value) before
    the growth counts: ½‖θ − c‖² from θ = 0 at η = 1 (no momentum) lands on c in one step; checked at the end of
    the first period (two of the epoch's four steps)."""
    theta = torch.nn.Parameter(torch.zeros(16, device=DEVICE))
    safe = BB([theta], lr=1.0, steps_per_epoch=4, backend="eager", momentum=0.0)
    for _ in range(2):
        safe.zero_grad()
        (0.5 * (theta - target).square().sum()).backward()
        safe.step()
    assert torch.equal(theta.detach(), torch.zeros(16, device=DEVICE)) == rolled_back
    assert safe.lr == pytest.approx(0.1 if rolled_back else 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rule_chosen_rate_that_diverges_is_rolled_back_to_the_last_good_period(backend: str) -> None:
    """Bounds τ_min = τ_max = 30 force every rate the control sets to 30 (no momentum): after a good first period
    at 0.1, 30 (θ times −29 each step) diverges and is rolled back to the end of that period; the next period
    returns to the last good rate 0.1, and the control's later rates are capped at a quarter of each rate that
    diverged (7.5, which diverges too), until 1.875 converges (θ times −0.875)."""
    safe, theta = quadratic_bb(0.1, safeguard=True, backend=backend, tau_min=30.0, tau_max=30.0, momentum=0.0)
    rates, thetas = [0.1], [theta.detach().clone()]
    for _ in range(10 // PERIOD):
        thetas.append(quadratic_steps(safe, theta, PERIOD))
        rates.append(safe.lr)
    assert rates == [pytest.approx(r) for r in (0.1, 30.0, 0.1, 7.5, 0.1, 1.875)]
    assert torch.equal(thetas[2], thetas[1]) and torch.equal(thetas[4], thetas[3])
    assert float(thetas[5].abs().max()) == pytest.approx(0.9**6)  # three good periods of two steps at 0.1
    after = quadratic_epochs(safe, theta, 7, 10)
    assert safe.lr_history == [pytest.approx(r) for r in [0.1] + [1.875] * 7]
    assert safe.rolled_back_epochs == [0]
    assert float(after[-1].abs().max()) == pytest.approx(0.9**6 * 0.875**70, rel=1e-4)
    assert safe.state_dict()["bb"]["lr_cap"] == pytest.approx(1.875)


def reported_loss_epochs(opt: BB, theta: torch.nn.Parameter, losses: list[list]) -> list[torch.Tensor]:
    """Train ½‖θ‖² (a rate of 0.1 only shrinks θ: the weights never diverge) while each step reports the given
    loss (None: no loss); θ after each epoch."""
    after = []
    for epoch_losses in losses:
        for loss in epoch_losses:
            opt.zero_grad()
            (0.5 * theta.square().sum()).backward()
            opt.step(loss=loss)
        after.append(theta.detach().clone())
    return after


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_tensors_on_the_device_roll_back_on_every_backend(backend: str) -> None:
    safe, theta = pinned_bb(backend)
    first = [torch.tensor(2.0, device=DEVICE)] + [torch.tensor(1.0, device=DEVICE)] * 9
    losses = [first, [torch.tensor([3.0], device=DEVICE)] * 10]
    after = reported_loss_epochs(safe, theta, losses)
    assert torch.equal(after[1], after[0]) and safe.rolled_back_epochs == [1]
    assert safe.lr == pytest.approx(
        0.1 * safeguard_control.CAP
    )  # the last good rate, at most CAP times the one that diverged


def test_loss_check_needs_every_step_and_a_reference() -> None:
    """Epoch 1 misses one loss: not checked; epoch 2 is compared with the best period before it (the mean 1 of
    epoch 0's later periods): rolled back; epoch 3 has an inf loss: rolled back too."""
    safe, theta = pinned_bb()
    losses = [[2.0] + [1.0] * 9, [None] + [100.0] * 9, [100.0] * 10, [1.0] * 9 + [math.inf]]
    after = reported_loss_epochs(safe, theta, losses)
    assert safe.rolled_back_epochs == [2, 3]
    assert torch.equal(after[3], after[1]) and not torch.equal(after[1], after[0])


@pytest.mark.parametrize("first", [-1.0, 0.0])
def test_loss_that_is_not_positive_disables_the_ratio(first: float) -> None:
    safe, theta = pinned_bb()
    reported_loss_epochs(safe, theta, [[first] * 10, [5.0] * 10])
    assert safe.rolled_back_epochs == []


def test_paper_method_ignores_the_loss() -> None:
    paper, theta = quadratic_bb(0.1, safeguard=False)
    with_losses = reported_loss_epochs(paper, theta, [[1.0] * 10, [100.0] * 10, [1e4] * 10])
    plain, theta = quadratic_bb(0.1, safeguard=False)
    without = reported_loss_epochs(plain, theta, [[None] * 10] * 3)
    assert all(torch.equal(a, b) for a, b in zip(with_losses, without))
    assert paper.lr_history == plain.lr_history


def test_closure_return_value_is_the_loss_unless_loss_is_given() -> None:
    safe, theta = pinned_bb()

    def closure_returning(value):
        def closure():
            safe.zero_grad()
            (0.5 * theta.square().sum()).backward()
            return value

        return closure

    for value in [torch.tensor(2.0)] + [torch.tensor(1.0)] * 9 + [torch.tensor(3.0)] * 10:
        assert safe.step(closure_returning(value)) is value
    assert safe.rolled_back_epochs == [1]
    for value in [("not", "a loss")] * 10:  # a tuple is not used: the epoch is not checked
        safe.step(closure_returning(value))
    for _ in range(10):  # the explicit loss wins over the closure's
        safe.step(closure_returning(torch.tensor(1e3)), loss=1.0)
    assert safe.rolled_back_epochs == [1]


@pytest.mark.parametrize(
    ("loss", "found"),
    [
        ("0.5", "'0.5'"),
        (True, "True"),
        (torch.tensor([1.0, 2.0]), r"a torch.float32 tensor of shape \(2,\)"),
        (torch.tensor(1), r"a torch.int64 tensor of shape \(\)"),
    ],
)
def test_bad_loss_raises_before_anything_is_written(loss, found: str) -> None:
    safe, theta = quadratic_bb(0.1, safeguard=True)
    (0.5 * theta.square().sum()).backward()
    with pytest.raises(TypeError, match=f"loss must be this step's training loss .* got {found}; pass"):
        safe.step(loss=loss)
    assert torch.equal(theta.detach(), torch.ones(16, device=DEVICE)) and safe.step_in_epoch == 0


def test_grad_scaler_passes_the_loss_on() -> None:
    safe, theta = pinned_bb()
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=4.0)
    for loss in [2.0] + [1.0] * 9 + [3.0] * 10:
        safe.zero_grad()
        scaler.scale(0.5 * theta.square().sum()).backward()
        scaler.step(safe, loss=torch.tensor(loss, device=DEVICE))
        scaler.update()
    assert safe.rolled_back_epochs == [1]


def test_mid_epoch_checkpoint_keeps_the_epoch_loss() -> None:
    """Saved halfway through an epoch whose losses triple, the resumed run rolls it back like the uninterrupted
    one; a state dict from before the loss check resumes without checking that epoch."""
    losses = [[2.0] + [1.0] * 9, [3.0] * 5]
    reference, theta = pinned_bb()
    reported_loss_epochs(reference, theta, losses)
    saved_theta, state = theta.detach().clone(), reference.state_dict()
    assert (state["bb"]["loss_sum"], state["bb"]["loss_steps"]) == (15.0, 5)
    assert state["bb"]["best_loss"] == 1.0  # epoch 0's best period mean
    expected = reported_loss_epochs(reference, theta, [[3.0] * 5])
    assert reference.rolled_back_epochs == [1]

    for old in (False, True):
        resumed, theta = pinned_bb()
        with torch.no_grad():
            theta.copy_(saved_theta)
        loaded = {**state, "bb": dict(state["bb"])}
        if old:  # version 1 from before the loss check
            for key in ("loss_sum", "loss_steps", "initial_loss", "best_loss", "last_loss", "good_lr", "loss_rollback"):
                del loaded["bb"][key]
            del loaded["bb"]["model_buffers"]
            loaded["bb"]["version"] = 1
        resumed.load_state_dict(loaded)
        after = reported_loss_epochs(resumed, theta, [[3.0] * 5])
        assert torch.equal(after[0], expected[0]) != old
        assert resumed.rolled_back_epochs == ([] if old else [1])


def test_batchnorm_network_wrecked_without_weight_growth_is_rolled_back_by_its_loss() -> None:
    """ResNet-18 (BatchNorm) on 2048 MNIST images, η0 = 0.01, then 1/3 at k = 1 (bounds τ_min = τ_max = 1 force it
    in both modes; the ResNet-18 stand-in of experiment 4 got the same rate from η0 = 1e-3 and 1e-2): the paper's
    BB ends epoch 3 with the loss up more than 10-fold and the test accuracy down to chance while ‖θ‖² barely
    changes (scale-invariant weights: the growth check cannot see it). The default (with the paper's update: no
    momentum) gets the bounds' rate 1 after its first period; the periods that rate and the capped 0.25 wreck are
    rolled back, each returning to the last good rate 0.01, and later rates stay under a quarter of 1."""
    options = ("--limit-train", "2048", "--limit-test", "500", "--tau-min", "1", "--tau-max", "1")
    paper = mnist_run(0.01, False, *options, model="resnet18")
    records = [paper.run_epoch(epoch) for epoch in (0, 1)]
    sq_norm = param_sq_norm(paper.model)
    records.append(paper.run_epoch(2))
    assert paper.optimizer.lr_history[2] == pytest.approx(1 / 3)
    assert records[2]["train_loss"] > 10 * records[1]["train_loss"] and records[2]["test_acc1"] < 20.0
    assert 0.5 < param_sq_norm(paper.model) / sq_norm < 2.0

    safe = mnist_run(0.01, True, *options, "--momentum", "0", model="resnet18")
    safe_records = [safe.run_epoch(epoch) for epoch in range(4)]
    history, bb = safe.optimizer.lr_history, safe.optimizer.state_dict()["bb"]
    assert safe.optimizer.rolled_back_epochs == [0] and safe_records[0]["rolled_back"]
    assert history[1] == pytest.approx(0.01)  # a rollback at the epoch's last period: back to the last good rate
    assert bb["lr_cap"] <= safeguard_control.CAP * 1.0 and max(history[1:]) <= bb["lr_cap"]
    assert not any(record["rolled_back"] for record in safe_records[1:])
    assert safe_records[-1]["test_acc1"] > 85.0  # the network kept learns (a rolled-back period keeps the last good)


def test_trainer_gives_bb_the_loss_and_restores_batchnorm_statistics() -> None:
    """ResNet-18 on 256 MNIST images at η0 = 100: the epoch is rolled back, and with the weights the training
    command restores the BatchNorm running statistics of the epoch start (the initial ones), so the test runs on
    the network the optimizer kept; BB saw each step's loss."""
    safe = mnist_run(100.0, True, "--limit-train", "256", "--limit-test", "256", model="resnet18")
    weights = [p.detach().clone() for p in safe.model.parameters()]
    buffers = [b.clone() for b in safe.model.buffers()]
    record = safe.run_epoch(0)
    assert record["rolled_back"] and safe.optimizer.rolled_back_epochs == [0]
    assert all(torch.equal(p, q) for p, q in zip(safe.model.parameters(), weights))
    assert all(torch.equal(b, c) for b, c in zip(safe.model.buffers(), buffers))
    assert safe.optimizer.state_dict()["bb"]["initial_loss"] == pytest.approx(math.log(10), abs=0.3)


DDP_LOSSES = (
    """
import sys
import torch
import torch.distributed as dist
from bbfused import BB

dist.init_process_group("gloo")
rank = dist.get_rank()
theta = torch.nn.Parameter(torch.ones(16))
# Held at 0.1 without momentum (tau_max): only the losses decide.
opt = BB([theta], lr=0.1, steps_per_epoch=10, backend="eager", momentum=0.0, tau_max=0.1)
# Alone, rank 1 would roll back epoch 0's first period (no progress from its first loss 2 while θ moved) and rank
# 0 would not. Together: the first period's mean 2.25 against the averaged first losses 3 is kept, epoch 0's
# later periods (1.5) and epoch 1 (1.8, under 1.25-fold of 1.5: no rise to roll back; ending at 1.8) too, and
# epoch 2's 9.5 (5.3 times the loss at the snapshot, 1.8) is rolled back on both ranks.
losses = [[4.0] + [1.0] * 9, [1.0] * 10, [17.0] * 10] if rank == 0 else [[2.0] * 10, [2.6] * 10, [2.0] * 10]
for epoch_losses in losses:
    for loss in epoch_losses:
        opt.zero_grad()
        (0.5 * theta.square().sum()).backward()
        opt.step(loss=loss)
torch.save({"theta": theta.detach(), "rolled_back": opt.rolled_back_epochs}, f"{sys.argv[1]}/rank{rank}.pt")
"""
    + END_OF_RANK
)


def test_ranks_decide_alike_under_torch_distributed(tmp_path) -> None:
    script = tmp_path / "ddp_losses.py"
    script.write_text(DDP_LOSSES)
    run_two_ranks(script, str(tmp_path), timeout=120)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert ranks[0]["rolled_back"] == ranks[1]["rolled_back"] == [2]
    assert torch.equal(ranks[0]["theta"], ranks[1]["theta"])


def test_checkpoint_after_a_rollback_loses_nothing() -> None:
    """Saved right after a rolled-back first period (η = 3 without momentum: θ times −2 each step) and loaded into
    a fresh optimizer, the run continues exactly as the uninterrupted one: the rule must still wait one period
    (the snapshots hold no good period end), and the open epoch counts as rolled back."""
    reference, theta = quadratic_bb(3.0, safeguard=True, momentum=0.0)
    quadratic_steps(reference, theta, PERIOD)
    buffer = io.BytesIO()
    torch.save({"theta": theta.detach().clone(), "opt": reference.state_dict()}, buffer)
    expected = [quadratic_steps(reference, theta, 10 - PERIOD)] + quadratic_epochs(reference, theta, 2, 10)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["opt"]["bb"]["has_snapshot"] is False
    assert saved["opt"]["bb"]["lr_cap"] == 3.0 * safeguard_control.CAP  # a fraction of the rate that diverged
    assert saved["opt"]["bb"]["rolled_back_epochs"] == [0]
    resumed, theta = quadratic_bb(0.5, safeguard=True, momentum=0.0)
    with torch.no_grad():
        theta.copy_(saved["theta"])
    resumed.load_state_dict(saved["opt"])
    resumed_after = [quadratic_steps(resumed, theta, 10 - PERIOD)] + quadratic_epochs(resumed, theta, 2, 10)
    assert all(torch.equal(a, b) for a, b in zip(resumed_after, expected))
    assert resumed.lr_history == reference.lr_history
    assert resumed.rolled_back_epochs == reference.rolled_back_epochs == [0]


def test_state_dict_from_before_the_safeguard_loads() -> None:
    opt, theta = quadratic_bb(0.1, safeguard=True)
    quadratic_epochs(opt, theta, 2, 10)
    state = opt.state_dict()
    # Version 1 as the first releases wrote it: no safeguard or loss keys at all.
    for key in checkpoint.CONTROL_KEYS:
        del state["bb"][key]
    state["bb"]["version"] = 1
    fresh, _ = quadratic_bb(0.1, safeguard=True)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["bb"]["has_snapshot"] is True  # epoch 2 >= 1: the snapshots are an epoch end
    assert fresh.state_dict()["bb"]["lr_cap"] == math.inf  # nothing diverged
    assert fresh.rolled_back_epochs == []


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lr_cap", 0.0, "lr_cap must be a number > 0 or inf"),
        ("lr_cap", math.nan, "lr_cap must be a number > 0 or inf"),
        ("lr_cap", "1", "lr_cap must be a number > 0 or inf"),
        ("lr_cap", True, "lr_cap must be a number > 0 or inf"),
        ("rolled_back_epochs", [2], r"rolled_back_epochs must be increasing epochs in \[0, 2\)"),
        ("rolled_back_epochs", [1, 0], "rolled_back_epochs must be increasing"),
        ("rolled_back_epochs", [True], "rolled_back_epochs must be increasing"),
        ("rolled_back_epochs", "0", "rolled_back_epochs must be increasing"),
        ("loss_steps", 1, r"loss_steps must be an int in \[0, 0\]"),
        ("loss_steps", True, "loss_steps must be an int"),
        ("loss_sum", "1", "loss_sum must be a number"),
    ],
)
def test_corrupt_safeguard_state_is_rejected_before_anything_is_written(key: str, value, message: str) -> None:
    opt, theta = quadratic_bb(0.1, safeguard=True)
    quadratic_epochs(opt, theta, 2, 10)
    state = opt.state_dict()
    state["bb"][key] = value
    fresh, _ = quadratic_bb(0.1, safeguard=True)
    before = fresh.state_dict()
    with pytest.raises(ValueError, match=message):
        fresh.load_state_dict(state)
    assert fresh.state_dict()["bb"] == before["bb"]


def test_safeguard_option_is_checked_and_on_by_default() -> None:
    assert quadratic_bb(0.1, safeguard=True)[0].safeguard
    assert BB([torch.nn.Parameter(torch.ones(2))], lr=0.1, steps_per_epoch=1, backend="eager").safeguard
    with pytest.raises(TypeError, match="safeguard must be True or False"):
        BB([torch.nn.Parameter(torch.ones(2))], lr=0.1, steps_per_epoch=1, safeguard="yes")
    assert parse_args([]).bb_safeguard is True
    assert parse_args(["--no-bb-safeguard"]).bb_safeguard is False
    with pytest.raises(UsageError, match="--bb-safeguard apply to --optimizer bb only"):
        parse_args(["--optimizer", "sgd", "--bb-safeguard"])


# ============================================================================================ the scripts
@pytest.mark.parametrize("script", [sensitivity, compare, report])
def test_scripts_have_help(script, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        script.main(["--help"])
    assert exit_.value.code == 0 and "--quick" in capsys.readouterr().out


def test_quick_sensitivity_and_report(tmp_path) -> None:
    """Experiment 1 in quick mode (512 images, 2 epochs): a run file per method and η0, then the tables and
    the figure; training the same grid again trains nothing."""
    runs = tmp_path / "runs"
    methods = "bb,bb-safe,sgd,sgd-cosine,sgd-step"
    argv = ["--quick", "--methods", methods, "--lrs", "0.1,1", "--out", str(runs / "sensitivity_quick")]
    sensitivity.main(argv)
    files = sorted((runs / "sensitivity_quick").glob("*.json"))
    assert len(files) == 10
    records = report.load(runs / "sensitivity_quick")
    for record in records:
        assert len(record["history"]) == 2 and record["run"]["epochs"] == 2
    by_name = {(r["run"]["method"], r["run"]["lr"]): r for r in records}
    assert by_name["bb", 0.1]["bb_lr_history"] == [0.1, 0.1]
    # Epoch 0 (4 steps: two periods) ends at η0 (no estimate after its first period); epoch 1 follows the estimate
    # (at most twofold up, tenfold down) times the end phase's factor for the second of two epochs.
    safe_history, factor = by_name["bb-safe", 0.1]["bb_lr_history"], safeguard_control.anneal_factor(1, 2)
    assert safe_history[0] == 0.1 and factor == pytest.approx(0.5)
    assert 0.1 * safeguard_control.RATE_SHRINK_LIMIT * factor <= safe_history[1]
    assert safe_history[1] <= 0.1 * safeguard_control.RATE_GROWTH_LIMIT * factor
    assert [e["rolled_back"] for e in by_name["bb-safe", 0.1]["history"]] == [False, False]
    for record in records:  # ‖θ‖² at the start and after each epoch; BB says what it rolled back (paper: nothing)
        assert len(record["param_sq_norms"]) == 3 and all(n > 0 for n in record["param_sq_norms"])
        assert ("rolled_back" in record["history"][0]) == record["run"]["method"].startswith("bb")
        if record["run"]["method"] == "bb":
            assert [e["rolled_back"] for e in record["history"]] == [False, False]
    mtimes = [f.stat().st_mtime_ns for f in files]
    sensitivity.main(argv)
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    # --retrain trains the chosen methods' runs again, even one a comparison folder holds; the others stay.
    (bb_file,) = [f for f in files if "_bb-safe_lr0.1_" in f.name]
    comparison = runs / "comparison_quick"
    comparison.mkdir()
    (comparison / bb_file.name).write_text("{}")  # a stale copy that a plain run would have reused
    bb_file.unlink()
    sensitivity.main([*argv[:2], "bb-safe", *argv[3:], "--retrain"])
    assert json.loads(bb_file.read_text())["run"]["method"] == "bb-safe"  # trained, not the stale copy
    retrained = {f.name for f, before in zip(files, mtimes) if f.stat().st_mtime_ns != before}
    assert retrained == {f.name for f in files if "_bb-safe_" in f.name}
    (comparison / bb_file.name).unlink()

    by_name = {(r["run"]["method"], r["run"]["lr"]): r for r in report.load(runs / "sensitivity_quick")}
    figures = tmp_path / "figures"
    figures.mkdir()
    blocks = report.main(["--quick", "--runs", str(runs), "--figures", str(figures)])
    assert "| BB + safeguard |" in blocks["sensitivity_mlp_spread"]
    rows = [line for line in blocks["sensitivity_mlp_results"].splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == [
        "| BB", "| BB + safeguard", "| SGD (momentum 0.9)", "| SGD (momentum 0.9) + cosine",
        "| SGD (momentum 0.9) + step",
    ]  # fmt: skip
    # The tuned recipe is the better of SGD + cosine and SGD + step at its better η0; each BB default run is
    # measured against it.
    recipes = {
        (m, lr): report.final(by_name[m, lr], "test_acc1") for m in ("sgd-cosine", "sgd-step") for lr in (0.1, 1.0)
    }
    (method, tuned) = max(recipes, key=recipes.get)
    assert [e["lr"] for e in by_name["sgd-cosine", tuned]["history"]] == [tuned, pytest.approx(tuned / 2)]
    assert [e["lr"] for e in by_name["sgd-step", tuned]["history"]] == [tuned, pytest.approx(tuned / 10)]
    recipe = blocks["sensitivity_mlp_recipe"]
    assert f"The tuned recipe, {report.LABELS[method]}: {recipes[method, tuned]:.2f} % at η0 = {tuned:g}" in recipe
    assert "+ cosine over η0 = 0.1 / 1: " in recipe and "+ step over η0 = 0.1 / 1: " in recipe
    for lr in (0.1, 1.0):
        bb_acc = report.final(by_name["bb-safe", lr], "test_acc1")
        assert f"| {lr:g} | 0 | {bb_acc:.2f} | {bb_acc - recipes[method, tuned]:+.2f} |" in recipe
    gaps = [report.final(by_name["bb-safe", lr], "test_acc1") - recipes[method, tuned] for lr in (0.1, 1.0)]
    assert f"{sum(g >= -1 for g in gaps)} within 1" in recipe and f"worst {min(gaps):+.2f}" in recipe
    assert (figures / "paper_sensitivity_mlp.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "| the network was above chance after it |" in blocks["sensitivity_mlp_growth"]
    # A folder kept out of the sweeps' tables gets one row per run, its last accuracy in bold.
    table = report.runs_table(report.load(runs / "sensitivity_quick")).splitlines()
    assert len(table) == 2 + 10
    cosine_rates = " ".join(f"{e['lr']:.3g}" for e in by_name["sgd-cosine", 1.0]["history"])
    assert any(row.startswith(f"| SGD (momentum 0.9) + cosine | 1 | 0 | {cosine_rates} | – |") for row in table)
    sgd = by_name["sgd", 1.0]
    accuracies = [f"{e['test_acc1']:.2f}" for e in sgd["history"]]
    accuracies[-1] = f"**{accuracies[-1]}**"
    expected = f"| SGD (momentum 0.9) | 1 | 0 | 1 (constant) | – | {' '.join(accuracies)} |"
    assert expected in table
    (safe_row,) = [row for row in table if row.startswith("| BB + safeguard | 0.1 | 0 | 0.1 ")]
    assert safe_row.split(" | ")[4] == "none"
    text = "a\n<!-- BEGIN x -->\nold\n<!-- END x -->\nb"
    assert report.replace_blocks(text, {"x": "new"}) == "a\n<!-- BEGIN x -->\nnew\n<!-- END x -->\nb"


def test_sensitivity_passes_device_and_training_options_on(capsys) -> None:
    args = sensitivity.parse(["--model", "resnet18", "--methods", "bb", "--lrs", "1", "--seeds", "0", "--device",
                              "cuda", "--", "--amp", "bf16", "--data", "/data/imagenette"])  # fmt: skip
    (run,) = sensitivity.grid(args)
    argv = run.argv()
    assert argv[argv.index("--device") + 1] == "cuda" and argv[argv.index("--model") + 1] == "resnet18"
    assert argv[-4:] == ["--amp", "bf16", "--data", "/data/imagenette"]
    assert run.name == "resnet18_bb_lr1_seed0_e10_amp_bf16_data_imagenette"
    with pytest.raises(SystemExit, match="before '--'"):
        sensitivity.parse(["--", "--lr=0.5"])
    with pytest.raises(SystemExit):  # a typo is not passed on to the training command
        sensitivity.parse(["--amp", "bf16"])
    assert "unrecognized arguments: --amp bf16 (options of the training command go after --)" in capsys.readouterr().err


def test_quick_comparison(tmp_path) -> None:
    """Experiment 2 in quick mode: tune two baselines on a 3-point grid, then train each at its best η0."""
    compare.main(["--quick", "--runs", str(tmp_path), "--baselines", "sgd,adam", "--bb-methods", "bb"])
    tuning = report.load(tmp_path / "tuning_quick")
    assert len(tuning) == 6
    best = compare.best_lrs(tuning)
    final = report.load(tmp_path / "comparison_quick")
    assert {(r["run"]["method"], r["run"]["lr"]) for r in final} == {
        ("sgd", best["sgd"]),
        ("adam", best["adam"]),
        ("bb", 0.1),
    }
    for method, lr in best.items():
        scores = [r["history"][-1]["test_acc1"] for r in tuning if r["run"]["method"] == method]
        chosen = next(r for r in tuning if r["run"]["method"] == method and r["run"]["lr"] == lr)
        assert chosen["history"][-1]["test_acc1"] == max(scores)
    # --retrain trains BB's compared run again; the baselines' tuning and compared runs stay as they were.
    files = [*tmp_path.glob("tuning_quick/*.json"), *tmp_path.glob("comparison_quick/*.json")]
    saved = {f: f.stat().st_mtime_ns for f in files}
    compare.main(["--quick", "--runs", str(tmp_path), "--baselines", "sgd,adam", "--bb-methods", "bb", "--retrain"])
    changed = {f"{f.parent.name}/{f.name.split('_lr')[0]}" for f, t in saved.items() if f.stat().st_mtime_ns != t}
    assert changed == {"comparison_quick/mlp_bb"}
