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
"""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import pytest
import torch

from bbfused import BB
from bbfused.train import UsageError, format_record, parse_args, prepare

PAPER = Path(__file__).resolve().parents[1] / "benchmarks" / "paper"
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


def mnist_run(lr: float, safeguard: bool, *options: str, model: str = "mlp"):
    flag = "--bb-safeguard" if safeguard else "--no-bb-safeguard"
    argv = ["--model", model, "--lr", str(lr), "--device", "cpu", "--limit-test", "1000", flag, *options]
    return prepare(parse_args([*argv, "--print-freq", "1000"]))


# ============================================================================================ failure modes
def test_initial_lr_too_large_nan_in_epoch_0_is_rolled_back() -> None:
    """η0 = 1 on the paper's MLP (4096 MNIST images, 32 steps an epoch): the paper's BB ends epoch 0 with
    NaN weights; the safeguard restores the initial weights exactly, runs epoch 1 at 0.1 and learns."""
    paper = mnist_run(1.0, False, "--limit-train", "4096")
    record = paper.run_epoch(0)
    assert math.isnan(record["train_loss"])
    assert not all(torch.isfinite(p).all() for p in paper.model.parameters())

    safe = mnist_run(1.0, True, "--limit-train", "4096")
    initial = [p.detach().clone() for p in safe.model.parameters()]
    records = [safe.run_epoch(0)]
    assert math.isnan(records[0]["train_loss"])
    assert all(torch.equal(p, q) for p, q in zip(safe.model.parameters(), initial))
    records += [safe.run_epoch(epoch) for epoch in (1, 2)]
    assert safe.optimizer.lr_history == [1.0, pytest.approx(0.1), pytest.approx(0.1)]  # no rule yet at epoch 1
    assert records[1]["train_loss"] < 1.0 and records[2]["train_loss"] < records[1]["train_loss"]
    assert records[2]["test_acc1"] > 85.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_blow_up_counts_as_diverged(backend: str) -> None:
    """η = 3 on ½‖θ‖² multiplies θ by −2 each step: after 10 steps ‖θ‖² grew 4^10-fold and is still finite."""
    paper, theta = quadratic_bb(3.0, safeguard=False)
    (after,) = quadratic_epochs(paper, theta, 1, 10)
    assert torch.isfinite(after).all() and after.square().sum() > 1e6

    safe, theta = quadratic_bb(3.0, safeguard=True, backend=backend)
    after = quadratic_epochs(safe, theta, 3, 10)
    assert torch.equal(after[0], torch.ones(16, device=DEVICE))  # rolled back to the first step's point
    assert safe.lr_history == [3.0, pytest.approx(0.3), pytest.approx(0.3)]
    assert safe.rolled_back_epochs == [0] and paper.rolled_back_epochs == []
    assert float(after[2].abs().max()) == pytest.approx(0.7**20, rel=1e-4)  # then it converges at 0.3


def test_lenet_dying_in_epoch_0_without_nan_is_rolled_back() -> None:
    """η0 = 1 on LeNet-5 (all of MNIST, as in experiment 3): the paper's BB ends epoch 0 with a dead network
    (loss ln 10, 10 % accuracy, finite weights) whose ‖θ‖² grew 7.3-fold; the safeguard rolls it back to the
    initial weights exactly and epoch 1 at 0.1 learns."""
    paper = mnist_run(1.0, False, model="lenet")
    initial_sq_norm = param_sq_norm(paper.model)
    record = paper.run_epoch(0)
    assert record["train_loss"] == pytest.approx(math.log(10), abs=0.05) and record["test_acc1"] < 15.0
    assert all(torch.isfinite(p).all() for p in paper.model.parameters())
    assert 4.0 < param_sq_norm(paper.model) / initial_sq_norm < 10.0  # caught by the 4-fold threshold, not by 10-fold

    safe = mnist_run(1.0, True, model="lenet")
    initial = [p.detach().clone() for p in safe.model.parameters()]
    safe_record = safe.run_epoch(0)
    assert safe_record["train_loss"] == record["train_loss"] and safe_record["rolled_back"]  # same epoch, rolled back
    assert "diverged: BB rolled the epoch back" in format_record(safe_record, 10)
    assert all(torch.equal(p, q) for p, q in zip(safe.model.parameters(), initial))
    assert safe.optimizer.lr == pytest.approx(0.1)
    next_record = safe.run_epoch(1)
    assert next_record["test_acc1"] > 90.0 and not next_record["rolled_back"]
    assert safe.optimizer.rolled_back_epochs == [0]


@pytest.mark.parametrize(("lr", "rolled_back"), [(2.0704, False), (2.0731, True)])
def test_growth_threshold_is_fourfold(lr: float, rolled_back: bool) -> None:
    """|1 − η|^20 is ‖θ‖²'s growth over the epoch: 3.9-fold at η = 2.0704 is kept, 4.1-fold at 2.0731 is rolled
    back (healthy epochs measured up to 2.5-fold, LeNet-5 dying 7.3- and 9.9-fold)."""
    safe, theta = quadratic_bb(lr, safeguard=True)
    (after,) = quadratic_epochs(safe, theta, 1, 10)
    assert torch.equal(after, torch.ones(16, device=DEVICE)) == rolled_back
    assert safe.lr == pytest.approx(lr / 10 if rolled_back else lr)


@pytest.mark.parametrize(("target", "rolled_back"), [(0.099, False), (0.101, True)])
def test_growth_from_zero_weights_counts_above_rms_0_1(target: float, rolled_back: bool) -> None:
    """Weights that start at zero may grow to an RMS of 0.1 in an epoch (the floor: 4 x 0.0025 per value) before
    the growth counts: ½‖θ − c‖² from θ = 0 at η = 1 lands on c in one step."""
    theta = torch.nn.Parameter(torch.zeros(16, device=DEVICE))
    safe = BB([theta], lr=1.0, steps_per_epoch=4, backend="eager")
    for _ in range(4):
        safe.zero_grad()
        (0.5 * (theta - target).square().sum()).backward()
        safe.step()
    assert torch.equal(theta.detach(), torch.zeros(16, device=DEVICE)) == rolled_back
    assert safe.lr == pytest.approx(0.1 if rolled_back else 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rates_after_a_divergence_are_capped_at_half_the_rate_that_diverged(backend: str) -> None:
    """Bounds that reject every BB ratio make the rule fall back to τ0/(k+2) = 20/(k+2): 6.67 at k = 1 diverges
    (θ times −5.67 each step), epoch 3 runs at 0.667, then the fallback 20/5 = 4 is capped at 6.67/2 = 3.33,
    which diverges too; after it the cap is 1.67 and the fallback 20/7 = 2.86 is cut to it (θ times −0.67).
    θ starts at 1e8 so that it stays above the floor (RMS 0.05) while the slower epochs shrink it."""
    safe, theta = quadratic_bb(0.1, safeguard=True, backend=backend, tau0=20.0, tau_min=1e-9, tau_max=1e-9)
    with torch.no_grad():
        theta.fill_(1e8)
    after = quadratic_epochs(safe, theta, 7, 10)
    expected = [0.1, 0.1, 20 / 3, 2 / 3, 10 / 3, 1 / 3, 5 / 3]
    assert safe.lr_history == [pytest.approx(rate) for rate in expected]
    assert torch.equal(after[2], after[1]) and torch.equal(after[4], after[3])  # the two rolled-back epochs
    assert safe.rolled_back_epochs == [2, 4]
    assert float(after[6].abs().max()) < float(after[5].abs().max())  # the capped rate converges
    assert safe.state_dict()["bb"]["lr_cap"] == pytest.approx(5 / 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rule_chosen_rate_that_diverges_is_rolled_back_to_the_last_good_epoch(backend: str) -> None:
    """Bounds that reject every BB ratio make the rule fall back to τ0/(k+2) = 30/3 = 10 after epoch 1 (θ times
    −9 each step); epoch 2 is rolled back to the end of epoch 1 and epoch 3 runs at 10/10."""
    safe, theta = quadratic_bb(0.1, safeguard=True, backend=backend, tau0=30.0, tau_min=1e-9, tau_max=1e-9)
    after = quadratic_epochs(safe, theta, 4, 10)
    assert safe.lr_history == [0.1, 0.1, pytest.approx(10.0), pytest.approx(1.0)]
    assert torch.equal(after[2], after[1])
    assert float(after[1].abs().max()) == pytest.approx(0.9**20, rel=1e-4)
    assert torch.equal(after[3], torch.zeros(16, device=DEVICE))  # η = 1 solves the quadratic in one step


def test_no_divergence_is_bit_identical_to_the_paper() -> None:
    """The safeguard changes nothing in a run that never diverges: same rates, same weights, bit for bit."""

    def train(safeguard: bool) -> tuple[list[float], torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        data, labels = torch.randn(64, 20), torch.randint(0, 3, (64,))
        # The shallow-network bounds: with the deep ones the rule picks 1.8 at k = 2, which grows this
        # random-label fit's ‖θ‖² 5-fold in an epoch whose loss rises 60% (the safeguard rolls that back).
        opt = BB(
            model.parameters(), lr=0.1, steps_per_epoch=8, weight_decay=5e-4, tau_min=1 / 3, tau_max=3.0,
            backend="eager", safeguard=safeguard,
        )  # fmt: skip
        for step in range(5 * 8):
            batch = slice(8 * (step % 8), 8 * (step % 8 + 1))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(data[batch]), labels[batch]).backward()
            opt.step()
        return opt.lr_history, torch.cat([p.detach().flatten() for p in model.parameters()])

    (paper_rates, paper_weights), (safe_rates, safe_weights) = train(False), train(True)
    assert safe_rates == paper_rates and len(set(paper_rates)) > 1  # the rule did act
    assert torch.equal(safe_weights, paper_weights)


def test_checkpoint_after_a_rollback_loses_nothing() -> None:
    """Saved right after a rolled-back epoch 0 and loaded into a fresh optimizer, the run continues exactly as
    the uninterrupted one: the rule must still wait one epoch (the snapshots hold no good epoch end)."""
    reference, theta = quadratic_bb(3.0, safeguard=True)
    quadratic_epochs(reference, theta, 1, 10)
    buffer = io.BytesIO()
    torch.save({"theta": theta.detach().clone(), "opt": reference.state_dict()}, buffer)
    expected = quadratic_epochs(reference, theta, 3, 10)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["opt"]["bb"]["has_snapshot"] is False
    assert saved["opt"]["bb"]["lr_cap"] == 1.5  # half the rate that diverged
    assert saved["opt"]["bb"]["rolled_back_epochs"] == [0]
    resumed, theta = quadratic_bb(0.5, safeguard=True)
    with torch.no_grad():
        theta.copy_(saved["theta"])
    resumed.load_state_dict(saved["opt"])
    resumed_after = quadratic_epochs(resumed, theta, 3, 10)
    assert all(torch.equal(a, b) for a, b in zip(resumed_after, expected))
    assert resumed.lr_history == reference.lr_history
    assert resumed.rolled_back_epochs == reference.rolled_back_epochs == [0]


def test_state_dict_from_before_the_safeguard_loads() -> None:
    opt, theta = quadratic_bb(0.1, safeguard=True)
    quadratic_epochs(opt, theta, 2, 10)
    state = opt.state_dict()
    del state["bb"]["has_snapshot"], state["bb"]["lr_cap"], state["bb"]["rolled_back_epochs"]
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
    argv = ["--quick", "--methods", "bb,bb-safe,sgd", "--lrs", "0.1,1", "--out", str(runs / "sensitivity_quick")]
    sensitivity.main(argv)
    files = sorted((runs / "sensitivity_quick").glob("*.json"))
    assert len(files) == 6
    records = report.load(runs / "sensitivity_quick")
    for record in records:
        assert len(record["history"]) == 2 and record["run"]["epochs"] == 2
    by_name = {(r["run"]["method"], r["run"]["lr"]): r for r in records}
    # BB and BB + safeguard agree bit for bit where nothing diverges.
    assert by_name["bb", 0.1]["history"][-1]["train_loss"] == by_name["bb-safe", 0.1]["history"][-1]["train_loss"]
    for record in records:  # ‖θ‖² at the start and after each epoch; BB + safeguard says what it rolled back
        assert len(record["param_sq_norms"]) == 3 and all(n > 0 for n in record["param_sq_norms"])
        assert ("rolled_back" in record["history"][0]) == (record["run"]["method"] == "bb-safe")
    mtimes = [f.stat().st_mtime_ns for f in files]
    sensitivity.main(argv)
    assert [f.stat().st_mtime_ns for f in files] == mtimes

    figures = tmp_path / "figures"
    figures.mkdir()
    blocks = report.main(["--quick", "--runs", str(runs), "--figures", str(figures)])
    assert "| BB + safeguard |" in blocks["sensitivity_mlp_spread"]
    rows = [line for line in blocks["sensitivity_mlp_results"].splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| BB", "| BB + safeguard", "| SGD (momentum 0.9)"]
    assert (figures / "paper_sensitivity_mlp.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "| the network was above chance after it |" in blocks["sensitivity_mlp_growth"]
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
