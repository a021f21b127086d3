"""The training command: MNIST default, image folders, synthetic data, DDP, resume and bad input (CPU)."""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bbfused import BB
from bbfused.train import build_optimizer, build_parser, main, parameter_groups, parse_args, prepare
from bbfused.train.checkpoints import resume_args
from bbfused.train.data import DataError, load_mnist
from bbfused.train.schedules import describe_schedule, scheduled_rate

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Small MNIST runs: 8 steps of 32 images per epoch; the eager backend, since the kernels are tested elsewhere.
TINY = ["--limit-train", "256", "--limit-test", "256", "--batch-size", "32", "--bb-backend", "eager"]


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def without_times(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in ("images_per_s", "train_time_s", "time_s")}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """An ImageNet-style folder: 11 classes (so top-5 is reported), 3 training and 1 validation PNG each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    generator = torch.Generator().manual_seed(0)
    for index in range(11):
        for split, count in (("train", 3), ("val", 1)):
            folder = root / split / f"class{index:02d}"
            folder.mkdir(parents=True)
            for n in range(count):
                pixels = torch.randint(0, 256, (40, 48, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{n}.png")
    return root


def test_mnist_files_are_checked(tmp_path):
    images, labels, test_images, test_labels = load_mnist()
    assert images.shape == (60000, 1, 28, 28) and test_images.shape == (10000, 1, 28, 28)
    assert labels.bincount().tolist()[:3] == [5923, 6742, 5958]  # the well-known class counts
    assert test_labels.shape == (10000,) and int(test_labels.max()) == 9

    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is missing"):
        load_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + bytes(12)))
    with pytest.raises(DataError, match="is corrupt: md5 of its contents is"):
        load_mnist(tmp_path)


def test_mnist_default_trains_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--limit-train", "6000", "--limit-test", "2000", "--epochs", "2", "--bb-backend", "eager"]
    assert main([*argv, "--output-dir", str(out)]) == 0

    log = read_log(out)
    assert [record["epoch"] for record in log] == [1, 2]
    assert log[1]["train_loss"] < log[0]["train_loss"] < math.log(10) / 2  # well under the loss at chance
    assert log[1]["test_acc1"] > 90.0
    assert "test_acc5" not in log[0]  # 10 classes: top-5 is not reported
    assert all(record["images_per_s"] > 0 for record in log)
    assert not any(record["rolled_back"] for record in log)

    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 2
    assert checkpoint["args"]["model"] == "mlp" and checkpoint["args"]["optimizer"] == "bb"
    # The default control: BB's own rate bounds and momentum (the paper's shallow taus need --no-bb-safeguard).
    assert checkpoint["args"]["tau_min"] is None and checkpoint["args"]["tau_max"] is None
    bb = checkpoint["optimizer"]["bb"]
    assert (bb["tau_min"], bb["tau_max"], bb["tau0"], bb["momentum"]) == (1e-4, 100.0, None, 0.9)
    assert bb["epoch"] == 2 and bb["epochs"] == 2  # --epochs is BB's plan for its end phase
    assert bb["steps_per_epoch"] == 47  # ceil(6000 / 128)
    # Each record's rate is the one BB's history holds for the epoch: its last rate period's.
    assert [record["lr"] for record in log] == bb["lr_history"]
    # Epoch 1 is split into periods of 47 // 4 = 11 steps (11, 11, 11, 14): the first has no estimate and keeps
    # η0, each of the two later inner period ends grows the rate at least 4-fold while the search goes on.
    assert log[0]["lr"] >= 0.1 * 4**2
    # The end phase of a 2-epoch plan halves r from epoch 2 on (cos(π/2)); a later epoch keeps that factor.
    assert bb["lr"] == pytest.approx(0.5 * bb["rate"])
    # After epoch 1 r follows the estimate, at most doubled: epoch 2 ran at no more than epoch 1's rate.
    assert 0.0 < log[1]["lr"] <= log[0]["lr"]
    assert set(checkpoint["model"]) == {f"{i}.{kind}" for i in (1, 4, 7) for kind in ("weight", "bias")}
    assert checkpoint["history"] == log
    best = torch.load(out / "best.pth", weights_only=True)
    assert best["best_acc1"] == max(record["test_acc1"] for record in log)
    assert (out / "curves.png").read_bytes()[:8] == PNG_SIGNATURE

    printed = capsys.readouterr().out.splitlines()
    expected_start = "mlp on MNIST: 47 steps/epoch of 128 images, bb lr 0.1 (default, rate bounds 0.0001..100, eager)"
    assert printed[0].startswith(expected_start)
    epoch_lines = [line for line in printed if line.startswith("epoch")]
    assert len(epoch_lines) == 2
    assert epoch_lines[1].startswith(f"epoch 2/2  lr {log[1]['lr']:.6g}  train loss ")
    assert f"{log[1]['test_acc1']:6.2f}%" in epoch_lines[1]


def test_image_folder_trains_resnet18(image_folder, tmp_path):
    out = tmp_path / "run"
    argv = ["--data", str(image_folder), "--model", "resnet18", "--image-size", "32", "--batch-size", "8"]
    argv += ["--workers", "0", "--epochs", "1", "--bb-backend", "eager", "--no-decay-norm-bias"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    (record,) = read_log(out)
    assert math.isfinite(record["train_loss"]) and record["train_loss"] > 0
    assert 0.0 <= record["test_acc1"] <= record["test_acc5"] <= 100.0
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["model"]["fc.weight"].shape == (11, 512)
    assert checkpoint["optimizer"]["bb"]["steps_per_epoch"] == 4  # 33 // 8: the incomplete batch is dropped
    # The default control bounds the rate of every network alike (the paper's deep-network taus are its mode's).
    bb = checkpoint["optimizer"]["bb"]
    assert checkpoint["args"]["tau_min"] is None and (bb["tau_min"], bb["tau_max"]) == (1e-4, 100.0)


def test_a_folder_run_resumes_from_anywhere_keeping_its_image_size(image_folder, tmp_path, monkeypatch, capsys):
    """The data folder is saved as an absolute path: a run started with a relative --data resumes from another
    directory, and --data typed again as another spelling of the same folder changes nothing (the image size and
    workers stay the run's); a folder where MNIST was is another kind of data and takes its own defaults."""
    monkeypatch.chdir(image_folder.parent)
    out = tmp_path / "run"
    argv = ["--data", image_folder.name, "--model", "resnet18", "--image-size", "24", "--batch-size", "16"]
    assert main([*argv, "--workers", "0", "--epochs", "1", "--bb-backend", "eager", "--output-dir", str(out)]) == 0
    saved = torch.load(out / "checkpoint.pth", weights_only=True)["args"]
    assert saved["data"] == str(image_folder.resolve()) and saved["image_size"] == 24
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    retyped = ["--data", f"{image_folder}/../{image_folder.name}", "--epochs", "2"]
    assert main([*retyped, "--resume", str(out / "checkpoint.pth")]) == 0
    assert "--data" not in capsys.readouterr().out  # no change to report
    resumed = torch.load(out / "checkpoint.pth", weights_only=True)["args"]
    assert (resumed["image_size"], resumed["workers"], resumed["epochs"]) == (24, 0, 2)
    args, _ = resume_args(parse_args(["--data", "mnist", "--model", "resnet18", "--epochs", "3", "--resume",
                                      str(out / "checkpoint.pth")]))  # fmt: skip
    assert args.image_size is None and args.data == "mnist"  # MNIST's own size


def test_image_folder_transforms_give_the_requested_size(image_folder):
    argv = ["--data", str(image_folder), "--model", "resnet18", "--image-size", "24", "--batch-size", "16"]
    training = prepare(parse_args([*argv, "--workers", "0"]))
    assert len(training.data.train) == 2  # 33 images: two full batches of 16
    images, labels = next(iter(training.data.train))
    assert images.shape == (16, 3, 24, 24) and labels.shape == (16,)
    images, _ = next(iter(training.data.test))
    assert images.shape == (11, 3, 24, 24)
    assert training.data.num_classes == 11


def test_mnist_trains_a_torchvision_model_on_its_gray_channel_repeated(capsys):
    argv = ["--model", "resnet18", "--limit-train", "256", "--limit-test", "64", "--epochs", "1", "--device", "cpu"]
    training = prepare(parse_args([*argv, "--batch-size", "32", "--channels-last"]))
    images, _ = next(iter(training.data.train))
    assert images.shape == (32, 3, 28, 28) and torch.equal(images[:, 0], images[:, 2])
    before = training.model.conv1.weight.detach().clone()
    (record,) = training.fit()
    assert math.isfinite(record["train_loss"]) and record["test_acc1"] >= 0.0
    assert not torch.equal(training.model.conv1.weight, before)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_synthetic_amp_channels_last(amp, capsys):
    argv = ["--data", "synthetic", "--model", "resnet18", "--image-size", "32", "--batch-size", "4", "--epochs", "1"]
    argv += ["--limit-train", "32", "--limit-test", "4", "--amp", amp, "--channels-last", "--bb-backend", "eager"]
    training = prepare(parse_args(argv))
    assert training.optimizer.steps_per_epoch == 8
    assert training.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    before = training.model.fc.weight.detach().clone()
    (record,) = training.fit()
    assert math.isfinite(record["train_loss"])
    assert "test_acc5" in record  # 1000 classes
    assert not torch.equal(training.model.fc.weight, before)
    assert training.optimizer.epoch == 1  # steps the scaler skipped (inf gradients) count too
    if amp == "fp16":
        assert training.scaler.get_scale() < 2.0**16  # it started at 2**16 and halved on each inf
    else:
        assert training.scaler is None


def test_the_progress_bar_ends_on_the_rate_the_epoch_ran_at(tmp_path, capsys):
    """BB's live rate moves to the next epoch's at the epoch's last step: the bar's last update shows the rate the
    epoch ran at, as the epoch's line does, not the next one."""
    out = tmp_path / "run"
    assert main([*TINY, "--epochs", "2", "--output-dir", str(out)]) == 0
    bars = capsys.readouterr().err.replace("\r", "\n")
    for record in read_log(out):
        epoch_bars = [
            line for line in bars.splitlines() if line.startswith(f"epoch {record['epoch']}/2") and "lr " in line
        ]
        assert epoch_bars[-1].split("lr ")[1].split()[0] == f"{record['lr']:.4g}", epoch_bars[-1]


def test_googlenet_trains_without_its_auxiliary_classifiers():
    """GoogLeNet's training-mode outputs would carry auxiliary logits the loss does not take: it is built without
    them and trains like any model."""
    argv = ["--data", "synthetic", "--model", "googlenet", "--image-size", "32", "--batch-size", "2", "--epochs", "1"]
    training = prepare(parse_args([*argv, "--limit-train", "4", "--limit-test", "2", "--bb-backend", "eager"]))
    assert training.model.aux1 is None
    (record,) = training.fit()
    assert math.isfinite(record["train_loss"])


@pytest.mark.parametrize("name", ["bb", "sgd", "nag", "adam", "amsgrad", "adagrad", "rmsprop"])
def test_every_optimizer_trains(name):
    argv = [*TINY, "--limit-train", "512", "--optimizer", name, "--epochs", "1"]
    if name != "bb":
        argv = [a for a in argv if a not in ("--bb-backend", "eager")]
    training = prepare(parse_args(argv))
    (record,) = training.fit()
    assert record["test_acc1"] > 50.0, record  # 16 steps of an MLP on MNIST: far above chance (10%)


def test_paper_mode_gets_the_loss_and_records_no_rollback(monkeypatch):
    """The trainer does not branch on BB's mode: every step gets the loss, which the paper's rule ignores (the
    weights match a run whose steps drop it), and each record says nothing was rolled back or skipped."""
    finals, losses = [], []
    for keep_loss in (True, False):
        training = prepare(parse_args([*TINY, "--no-bb-safeguard", "--epochs", "2"]))

        def recording_step(*args, loss=None, _keep=keep_loss, _step=training.optimizer.step, **kwargs):
            losses.append(loss)
            return _step(*args, **({"loss": loss} if _keep else {}), **kwargs)

        monkeypatch.setattr(training.optimizer, "step", recording_step)
        history = training.fit()
        finals.append({key: value.clone() for key, value in training.model.state_dict().items()})
    assert len(losses) == 2 * 2 * 8 and all(isinstance(loss, torch.Tensor) and loss.ndim == 0 for loss in losses)
    assert [(r["rolled_back"], r["skipped_gradient_values"]) for r in history] == [(False, 0), (False, 0)]
    for key, value in finals[0].items():
        assert torch.equal(finals[1][key], value), key


def test_trainer_has_no_import_cycle():
    """The modules of bbfused.train import each other as a tree (every import counted, also those inside
    functions), so each can be read, tested and imported on its own."""
    import ast

    package = REPO / "bbfused" / "train"
    modules = {path.stem: path for path in package.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module is None:  # from . import a, b: modules, or names of the package's __init__
                    edges.update(alias.name if alias.name in modules else "__init__" for alias in node.names)
                else:
                    edges.add(node.module.split(".")[0])
            elif (
                isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("bbfused.train")
            ):
                edges.add((node.module.split(".")[2:] or ["__init__"])[0])
    assert {edge for edges in graph.values() for edge in edges} <= set(modules)
    assert "checkpoints" in graph["building"] and "options" in graph["checkpoints"]  # the walk sees the imports

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        for successor in sorted(graph[node]):
            found = cycle_from(successor, [*path, node])
            if found:
                return found
        return None

    cycles = [cycle for name in sorted(modules) if (cycle := cycle_from(name, []))]
    assert not cycles, " -> ".join(cycles[0])


def test_optimizer_settings():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    groups = parameter_groups(model, 5e-4, no_decay_norm_bias=True)
    assert [len(group["params"]) for group in groups] == [2, 4]
    assert [group["weight_decay"] for group in groups] == [5e-4, 0.0]

    nag = build_optimizer("nag", groups, parse_args(["--optimizer", "nag"]), steps_per_epoch=10)
    assert isinstance(nag, torch.optim.SGD) and nag.defaults["nesterov"] and nag.defaults["momentum"] == 0.9
    amsgrad = build_optimizer("amsgrad", groups, parse_args(["--optimizer", "amsgrad"]), steps_per_epoch=10)
    assert amsgrad.defaults["amsgrad"] and amsgrad.defaults["lr"] == 1e-3

    def bb_for(argv: list[str]) -> BB:
        # Groups of their own: torch's optimizers above filled theirs with their options (nesterov, momentum).
        fresh = parameter_groups(model, 5e-4, no_decay_norm_bias=True)
        bb = build_optimizer("bb", fresh, parse_args([*argv, "--bb-backend", "eager"]), steps_per_epoch=10)
        assert isinstance(bb, BB)
        return bb

    def settings(bb: BB) -> tuple:
        return bb.tau_min, bb.tau_max, bb.tau0, bb.beta, bb.state_dict()["bb"]["momentum"]

    # The default control: its own rate bounds, no fallback rate, momentum 0.9, for shallow and deep networks.
    bb = bb_for(["--model", "lenet"])
    assert settings(bb) == (1e-4, 100.0, None, 0.4, 0.9)
    assert [group["weight_decay"] for group in bb.param_groups] == [5e-4, 0.0]
    # The paper's method: the paper's bounds (shallow 1/3..3 for lenet and mlp, else BB's deep 0.1..10), no momentum.
    assert settings(bb_for(["--model", "lenet", "--no-bb-safeguard"])) == (pytest.approx(1 / 3), 3.0, 1.0, 0.4, 0.0)
    assert settings(bb_for(["--data", "synthetic", "--no-bb-safeguard"])) == (0.1, 10.0, 1.0, 0.4, 0.0)
    assert settings(bb_for(["--momentum", "0", "--tau-max", "5"])) == (1e-4, 5.0, None, 0.4, 0.0)
    assert bb_for(["--epochs", "7"]).epochs == 7
    # Adam's scaling: the run starts at min(--lr, 1e-3) and keeps the second moments.
    adam = bb_for(["--bb-preconditioner", "adam"])
    assert adam.lr == 1e-3 and adam.state_dict()["bb"]["preconditioner"] == "adam"
    first_line = prepare(parse_args([*TINY, "--bb-preconditioner", "adam"])).describe()
    assert "bb lr 0.1 (default, Adam-scaled step starting at 0.001, rate bounds" in first_line
    assert (
        "Adam-scaled step, rate"
        in prepare(parse_args([*TINY, "--bb-preconditioner", "adam", "--lr", "1e-4"])).describe()
    )
    assert bb_for(["--bb-preconditioner", "none"]).state_dict()["bb"]["preconditioner"] is None
    assert parse_args([]).bb_preconditioner == "none"
    deep = parse_args(["--data", "synthetic"])
    assert (deep.model, deep.tau_min, deep.tau_max, deep.image_size) == ("resnet50", None, None, 224)
    assert parse_args(["--tau-min", "0.2"]).tau_min == 0.2


def resume_after_epoch_2_matches_whole_run(argv: list[str], retyped: list[str], tmp_path, monkeypatch) -> list[dict]:
    """Train ``argv`` (4 epochs) whole, and again stopped by SIGTERM after epoch 2 and resumed with ``retyped`` and
    ``--resume``: asserts that both runs log the same epochs (times aside) and end with the same weights. Returns
    the whole run's log."""
    from bbfused.train import loop as train_loop

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main([*argv, "--output-dir", str(whole)]) == 0
    save = train_loop.save_checkpoints

    def terminated_after_epoch_2(out, checkpoint, improved) -> None:
        if checkpoint["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # held until the epoch's files are written
        save(out, checkpoint, improved)

    monkeypatch.setattr(train_loop, "save_checkpoints", terminated_after_epoch_2)
    assert main([*argv, "--output-dir", str(parts)]) == 143
    monkeypatch.undo()
    assert [r["epoch"] for r in read_log(parts)] == [1, 2]
    assert main([*retyped, "--resume", str(parts / "checkpoint.pth")]) == 0

    expected, resumed = read_log(whole), read_log(parts)
    assert len(resumed) == 4
    assert [without_times(r) for r in resumed] == [without_times(r) for r in expected]
    final = torch.load(whole / "checkpoint.pth", weights_only=True)
    again = torch.load(parts / "checkpoint.pth", weights_only=True)
    for key, value in final["model"].items():
        assert torch.equal(again["model"][key], value), key
    return expected


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """A run of 4 epochs stopped after epoch 2 (SIGTERM) and resumed: epochs 3 and 4 (BB's rate from restored
    snapshots and its end phase from the saved plan, dropout from restored RNG states) are the same as in an
    uninterrupted run. (A run planned for 2 epochs is another run: BB anneals its epoch 2.)"""
    # --epochs 4 comes from the checkpoint on resuming.
    expected = resume_after_epoch_2_matches_whole_run([*TINY, "--epochs", "4"], TINY, tmp_path, monkeypatch)
    assert expected[2]["lr"] != 0.1 and expected[3]["lr"] != expected[2]["lr"]  # BB chose them


def test_resume_with_more_epochs_follows_the_new_plan_at_once(tmp_path):
    """A finished 2-epoch run continued to 4 epochs: BB takes the new plan ("a new plan given to the constructor
    wins"), so epoch 3 runs at r times the 4-epoch plan's factor for it, the cosine at the middle of the first of
    its two end-phase epochs, 0.5 (1 + cos(π/4)) ≈ 0.854, not the 2-epoch plan's 0.5 (r: the rate control's rate,
    which the checkpoint holds)."""
    out = tmp_path / "run"
    assert main([*TINY, "--epochs", "2", "--output-dir", str(out)]) == 0
    saved = torch.load(out / "checkpoint.pth", weights_only=True)["optimizer"]["bb"]
    assert saved["epochs"] == 2 and saved["lr"] == pytest.approx(0.5 * saved["rate"])  # past the 2-epoch plan
    assert main([*TINY, "--epochs", "4", "--resume", str(out / "checkpoint.pth")]) == 0
    assert torch.load(out / "checkpoint.pth", weights_only=True)["optimizer"]["bb"]["epochs"] == 4
    assert read_log(out)[2]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)) * saved["rate"])


BASELINE_TINY = [a for a in TINY if a not in ("--bb-backend", "eager")]


def test_cosine_schedule_is_torchs_cosine_annealing_per_epoch(tmp_path, capsys):
    """--lr-schedule cosine: each epoch of SGD runs at the rate torch's CosineAnnealingLR(T_max=epochs), stepped
    once per epoch, gives it; the log and the first line say so. Without it the rate stays --lr."""
    out = tmp_path / "cosine"
    argv = [*BASELINE_TINY, "--optimizer", "sgd", "--lr", "0.2", "--epochs", "4"]
    assert main([*argv, "--lr-schedule", "cosine", "--output-dir", str(out)]) == 0
    assert "sgd lr 0.2, cosine annealing to 0 over 4 epochs" in capsys.readouterr().out
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=4)
    expected = []
    for _ in range(4):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        annealing.step()
    rates = [record["lr"] for record in read_log(out)]
    assert rates == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert rates == pytest.approx([0.2, 0.1 * (1 + math.cos(math.pi / 4)), 0.1, 0.1 * (1 - math.cos(math.pi / 4))])
    constant = prepare(parse_args([*argv, "--epochs", "2"]))
    assert constant.args.lr_schedule == "constant"
    assert [record["lr"] for record in constant.fit()] == [0.2, 0.2]


def test_step_schedule_is_torchs_multistep_per_epoch(tmp_path, capsys):
    """--lr-schedule step: SGD's rate is divided by 10 after a third and two thirds of the epochs, as torch's
    MultiStepLR with milestones ceil(E/3), ceil(2E/3) stepped once per epoch gives it; the first line says when."""
    out = tmp_path / "step"
    argv = [*BASELINE_TINY, "--optimizer", "sgd", "--lr", "0.2", "--epochs", "5", "--lr-schedule", "step"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    assert "sgd lr 0.2, divided by 10 after epochs 2 and 4 of 5, weight decay" in capsys.readouterr().out
    assert [record["lr"] for record in read_log(out)] == pytest.approx([0.2, 0.2, 0.02, 0.02, 0.002], rel=1e-12)
    for epochs in (1, 2, 3, 4, 10, 90):
        reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
        milestones = [math.ceil(epochs / 3), math.ceil(2 * epochs / 3)]
        steps = torch.optim.lr_scheduler.MultiStepLR(reference, milestones=milestones, gamma=0.1)
        expected = []
        for _ in range(epochs):
            expected.append(reference.param_groups[0]["lr"])
            reference.step()
            steps.step()
        rates = [scheduled_rate("step", 0.2, epoch, epochs) for epoch in range(epochs)]
        assert rates == pytest.approx(expected, rel=1e-12), epochs
    assert describe_schedule("step", 90) == "divided by 10 after epochs 30 and 60 of 90"
    assert describe_schedule("step", 2) == "divided by 10 after epoch 1 of 2"
    assert describe_schedule("step", 1) == ""  # one epoch: nothing to divide


def torch_warmup_rates(schedule: str, lr: float, warmup: int, epochs: int) -> list[float]:
    """The rates of torch's SequentialLR: LinearLR(start_factor=1/(warmup+1), total_iters=warmup) for the first
    ``warmup`` epochs, then ``schedule`` over the rest, stepped once an epoch."""
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    rest = epochs - warmup
    warming = torch.optim.lr_scheduler.LinearLR(reference, start_factor=1 / (warmup + 1), total_iters=warmup)
    following = {
        "constant": lambda: torch.optim.lr_scheduler.ConstantLR(reference, factor=1.0, total_iters=0),
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=rest),
        "step": lambda: torch.optim.lr_scheduler.MultiStepLR(
            reference, milestones=[math.ceil(rest / 3), math.ceil(2 * rest / 3)], gamma=0.1
        ),
    }[schedule]()
    sequence = torch.optim.lr_scheduler.SequentialLR(reference, [warming, following], milestones=[warmup])
    rates = []
    for _ in range(epochs):
        rates.append(reference.param_groups[0]["lr"])
        reference.step()
        sequence.step()
    return rates


@pytest.mark.parametrize("schedule", ["constant", "cosine", "step"])
def test_warmup_is_torchs_linear_warmup_then_the_schedule(schedule):
    """--warmup-epochs K: epoch e < K runs at (e+1)/(K+1) of --lr, and the schedule runs over the remaining
    epochs after them, as torch's SequentialLR of LinearLR and the schedule, stepped once an epoch, gives it."""
    for warmup, epochs in ((1, 2), (1, 4), (2, 5), (5, 90), (3, 10)):
        expected = torch_warmup_rates(schedule, 0.4, warmup, epochs)
        rates = [scheduled_rate(schedule, 0.4, epoch, epochs, warmup) for epoch in range(epochs)]
        assert rates == pytest.approx(expected, rel=1e-12, abs=1e-15), (warmup, epochs)
    assert [scheduled_rate("cosine", 0.4, e, 5, 2) for e in range(3)] == pytest.approx([0.4 / 3, 0.8 / 3, 0.4])
    with pytest.raises(ValueError, match="a warmup of 4 epochs needs at least 5 epochs, not 4"):
        scheduled_rate(schedule, 0.4, 0, 4, 4)


def test_warmup_run_logs_and_describes_it(tmp_path, capsys):
    """A 5-epoch SGD run with --warmup-epochs 2 and the step schedule: the log shows the warmup's rates, then the
    step schedule over the last 3 epochs; the first line names both."""
    out = tmp_path / "warm"
    argv = [*BASELINE_TINY, "--optimizer", "sgd", "--lr", "0.06", "--epochs", "5", "--lr-schedule", "step"]
    assert main([*argv, "--warmup-epochs", "2", "--output-dir", str(out)]) == 0
    first = "sgd lr 0.06, linear warmup over 2 epochs, then divided by 10 after epochs 3 and 4 of 5, weight decay"
    assert first in capsys.readouterr().out
    assert [r["lr"] for r in read_log(out)] == pytest.approx([0.02, 0.04, 0.06, 0.006, 0.0006], rel=1e-12)
    assert describe_schedule("constant", 4, 1) == "linear warmup over 1 epoch"
    assert describe_schedule("cosine", 4, 3) == "linear warmup over 3 epochs, then cosine annealing to 0 over 1 epoch"
    assert describe_schedule("step", 3, 2) == "linear warmup over 2 epochs"  # one epoch after it: nothing to divide


def test_warmup_run_resumes_exactly(tmp_path, monkeypatch):
    """A cosine SGD run with a 3-epoch warmup, stopped inside the warmup after epoch 2 of 4, resumes at the
    warmup's third rate and ends as an uninterrupted run."""
    argv = [*BASELINE_TINY, "--optimizer", "sgd", "--lr-schedule", "cosine", "--epochs", "4", "--warmup-epochs", "3"]
    whole = resume_after_epoch_2_matches_whole_run(argv, [], tmp_path, monkeypatch)
    assert [r["lr"] for r in whole] == pytest.approx([0.025, 0.05, 0.075, 0.1], rel=1e-12)


def test_step_run_resumes_exactly(tmp_path, monkeypatch):
    """A step SGD run stopped after epoch 2 of 4, on the first epoch of the second stage, resumes at that stage's
    rate and ends with the weights and log of an uninterrupted run."""
    argv = [*BASELINE_TINY, "--optimizer", "sgd", "--lr-schedule", "step", "--epochs", "4"]
    whole = resume_after_epoch_2_matches_whole_run(argv, [], tmp_path, monkeypatch)
    assert [r["lr"] for r in whole] == pytest.approx([0.1, 0.1, 0.01, 0.001], rel=1e-12)


def test_cosine_run_resumes_exactly_and_replans_with_more_epochs(tmp_path, monkeypatch):
    """A cosine SGD run stopped after epoch 2 and resumed ends with the weights of an uninterrupted one (the rate
    follows from the epoch, so no scheduler state is saved); continued to 6 epochs, it anneals over 6 from then."""
    argv = [*BASELINE_TINY, "--optimizer", "sgd", "--lr-schedule", "cosine", "--epochs", "4"]
    resume_after_epoch_2_matches_whole_run(argv, [], tmp_path, monkeypatch)
    whole = tmp_path / "whole"
    assert main(["--epochs", "6", "--resume", str(whole / "checkpoint.pth")]) == 0
    assert [r["lr"] for r in read_log(whole)[4:]] == pytest.approx(
        [0.05 * (1 + math.cos(math.pi * epoch / 6)) for epoch in (4, 5)]
    )


def test_torchrun_two_processes_match_one(tmp_path):
    """DDP on 2 CPU processes (gloo), 32 images each, equals one process with batches of 64: same global
    batches (DistributedSampler interleaves one shuffled order); LeNet has no dropout."""
    common = ["--model", "lenet", "--limit-train", "512", "--limit-test", "256", "--epochs", "3"]
    # A low τ_min keeps the default from lifting epoch 2's rate to 1/6, where LeNet on 512 images is chaotic
    # enough to amplify the float rounding differences between the two reductions past the tolerance below.
    common += ["--bb-backend", "eager", "--tau-min", "0.01"]
    script = tmp_path / "train_and_dump.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import torch
            from bbfused.train import parse_args, prepare

            training = prepare(parse_args(sys.argv[2:]))
            history = training.fit()
            state = {"params": training.model.state_dict(), "history": history}
            torch.save(state, f"{sys.argv[1]}/rank{training.shard.rank}.pt")
            training.close()
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(script), str(tmp_path), *common, "--batch-size", "32"]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]

    single = prepare(parse_args([*common, "--batch-size", "64"]))
    history = single.fit()
    assert single.optimizer.steps_per_epoch == 8
    for key, value in single.model.state_dict().items():
        assert torch.equal(ranks[0]["params"][key], ranks[1]["params"][key]), key
        torch.testing.assert_close(ranks[0]["params"][key], value, rtol=1e-4, atol=1e-5)
    for distributed, alone in zip(ranks[0]["history"], history):
        assert distributed["lr"] == pytest.approx(alone["lr"], rel=1e-4)
        assert distributed["train_loss"] == pytest.approx(alone["train_loss"], rel=1e-4)
        assert distributed["test_acc1"] == pytest.approx(alone["test_acc1"], abs=0.5)
    assert history[2]["lr"] != 0.1  # the BB rule ran on both sides


# ------------------------------------------------------------------------------------------- bad input
def run_bad(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing", "does not exist"),
        (lambda root: root, "is empty"),
        (lambda root: (root / "images").mkdir() or root, "has no train/ and no val/ sub-folder"),
        (lambda root: (root / "train").mkdir() or root, "has no val/ sub-folder"),
        (lambda root: [(root / s).mkdir() for s in ("train", "val")] and root, "has no class sub-folders"),
    ],
    ids=["missing", "empty", "no-train-val", "no-val", "no-classes"],
)
def test_bad_data_folder(tmp_path, capsys, make, message):
    root = tmp_path / "data"
    root.mkdir()
    data = make(root)
    out = tmp_path / "out"
    err = run_bad(["--data", str(data), "--output-dir", str(out)], capsys)
    assert message in err and str(data) in err
    assert not out.exists()


def names_only_tree(root: Path, per_class: int = 8) -> Path:
    """train/ and val/ with classes a and b of empty *.png files: enough for scanning, which reads no image."""
    for split in ("train", "val"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for n in range(per_class):
                (root / split / name / f"{n}.png").touch()
    return root


@pytest.mark.parametrize(
    ("link", "target"),
    [
        ("train/a/loop", "."),  # 32 files became 672
        ("train/a/up", ".."),  # 1,312
        ("train/c", "."),  # a class c of a's and b's images
        ("train/c", "../val/a"),  # a class that is a folder of the tree
        ("train/a/twice.png", "../b/0.png"),  # one image under two classes
        ("val", "train"),  # the training images evaluated as the test set
    ],
)
def test_image_folder_links_back_into_it_are_refused(tmp_path, capsys, link, target):
    """The scan followed every link: a link back into the data folder multiplied and mislabelled images (or
    looped). Such a link is refused, by name, before anything is built."""
    root = names_only_tree(tmp_path / "data")
    if link == "val":
        shutil.rmtree(root / "val")
    (root / link).symlink_to(target)
    argv = ["--data", str(root), "--model", "mlp", "--image-size", "16", "--workers", "0", "--device", "cpu"]
    err = run_bad([*argv, "--output-dir", str(tmp_path / "out")], capsys)
    assert f"{root / link} is a link to" in err and "count the same images twice" in err
    assert not (tmp_path / "out").exists()


def test_image_folder_links_out_of_it_are_followed(tmp_path, capsys):
    """Links to folders elsewhere (a class or a split stored on another disk) are followed, in torchvision's
    ImageFolder order; a loop among them is refused rather than followed forever."""
    from torchvision.datasets import ImageFolder

    from bbfused.train.data import scan_images

    root = names_only_tree(tmp_path / "data")
    outside = names_only_tree(tmp_path / "elsewhere", per_class=3)
    (root / "train" / "c").symlink_to(outside / "train" / "a")
    (root / "val" / "c").symlink_to(outside / "val" / "a")
    (root / "train" / "a" / "more").symlink_to(outside / "train" / "b")
    classes, samples = scan_images(root / "train", root)
    assert classes == ["a", "b", "c"] and len(samples) == 8 + 3 + 8 + 3
    reference = ImageFolder(str(root / "train"), loader=lambda path: path)
    assert samples == reference.samples
    (outside / "train" / "b" / "again").symlink_to(outside / "train" / "b")
    with pytest.raises(DataError, match="which .* already reaches: its images would count twice"):
        scan_images(root / "train", root)


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_is_named_with_what_to_do(tmp_path, capsys, workers):
    """An image that does not decode ended the run with PIL's traceback; now with exit 2, naming the file and
    the fix (also when a loader process found it, whose traceback DataLoader prepends)."""
    from PIL import Image

    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for n in range(2):
                Image.new("RGB", (12, 12), (n * 90, 30, 60)).save(tmp_path / split / name / f"{n}.png")
    (tmp_path / "train" / "a" / "bad.png").write_bytes(b"not an image")
    argv = ["--data", str(tmp_path), "--model", "mlp", "--image-size", "12", "--workers", str(workers)]
    err = run_bad([*argv, "--batch-size", "5", "--epochs", "1", "--bb-backend", "eager", "--device", "cpu"], capsys)
    assert f"error: {tmp_path / 'train' / 'a' / 'bad.png'} is not a readable image" in err
    assert "remove it or replace it" in err and "Traceback" not in err
    assert "stopped; nothing was saved (no --output-dir)" in err


def test_class_folder_without_images(tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
    assert "needs at least one image" in run_bad(["--data", str(tmp_path), "--workers", "0"], capsys)


# Added to the options of a test that expects a refusal: a run that is wrongly accepted then trains one step of
# 64 images and fails the test in seconds, instead of training 10 epochs of MNIST for minutes.
NO_TRAINING = ["--limit-train", "64", "--limit-test", "64", "--epochs", "1"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "resnet51"], "unknown model 'resnet51'"),
        (["--optimizer", "lamb"], "invalid choice: 'lamb'"),
        (["--image-size", "32"], "MNIST images are 28x28"),
        (["--optimizer", "adam", "--tau-max", "5"], "--tau-max apply to --optimizer bb only"),
        (["--optimizer", "adam", "--momentum", "0.9"], "--momentum applies to sgd, nag and bb, not adam"),
        (["--optimizer", "nag", "--momentum", "0"], "--optimizer nag (Nesterov) needs --momentum > 0"),
        (["--tau-min", "4", "--tau-max", "3"], "--tau-min 4 is above --tau-max 3"),
        # The paper's method gives the mlp the paper's shallow bounds 1/3..3.
        (["--no-bb-safeguard", "--tau-min", "4"], "--tau-min 4 is above --tau-max 3"),
        (["--tau0", "2"], "--tau0 is the paper's fallback rate: it applies with --no-bb-safeguard only"),
        (["--no-bb-safeguard", "--bb-preconditioner", "adam"], "--bb-preconditioner adam needs BB's rate control"),
        (["--optimizer", "sgd", "--bb-preconditioner", "adam"], "--bb-preconditioner apply to --optimizer bb only"),
        (["--bb-preconditioner", "lamb"], "invalid choice: 'lamb'"),
        (["--lr-schedule", "cosine"], "--lr-schedule cosine applies to the baseline optimizers: bb sets its own"),
        (["--optimizer", "sgd", "--lr-schedule", "linear"], "invalid choice: 'linear'"),
        (["--warmup-epochs", "2"], "--warmup-epochs 2 applies to the baseline optimizers: bb approaches its rate"),
        (["--optimizer", "sgd", "--warmup-epochs", "1"], "--warmup-epochs 1 leaves no epoch of the schedule"),
        (["--optimizer", "sgd", "--warmup-epochs", "-1"], "must be an integer >= 0"),
        (["--data", "synthetic", "--model", "vit_b_16", "--image-size", "32"], "cannot take 32x32 images (Wrong"),
        (["--data", "synthetic", "--model", "alexnet", "--image-size", "28"], "alexnet' cannot take 28x28 images"),
        (["--batch-size", "0"], "must be an integer > 0"),
        (["--lr", "nan"], "must be > 0"),
        (["--device", "foo"], "'foo' is not a device"),
        (["--device", "mps"], "trains on cpu or cuda"),
    ],
)
def test_bad_options(capsys, argv, message):
    assert message in run_bad([*argv, *NO_TRAINING], capsys)


def test_tau_min_above_the_default_bound_is_refused(capsys):
    """--tau-min alone is checked against the mode's own tau_max as --tau-min with --tau-max is."""
    assert "--tau-min 200 is above --tau-max 100" in run_bad(["--tau-min", "200", *NO_TRAINING], capsys)


def test_help_and_option_errors_load_no_torch():
    """--help and the mistakes found without a device or a torchvision model name answer at once: neither
    imports torch (importing it, and torch._dynamo with the optimizer, took 7-20 s on a loaded 2-core machine)."""
    script = textwrap.dedent(
        f"""
        import contextlib, io, sys
        from bbfused.train import main
        mistakes = (
            ["--batch-size", "0"],
            ["--tau-min", "4", "--tau-max", "3"],
            ["--tau0", "2"],
            ["--optimizer", "adam", "--tau0", "2"],
            ["--optimizer", "adam", "--momentum", "0.9"],
        )
        codes = []
        for argv in (["--help"], *(m + {NO_TRAINING!r} for m in mistakes)):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                codes.append(main(argv))
        print(codes, sorted(name for name in ("torch", "torchvision") if name in sys.modules))
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    finished = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert finished.stdout.split("\n")[0] == "[0, 2, 2, 2, 2, 2] []", finished.stdout + finished.stderr[-2000:]


def test_bb_settings_read_from_the_source_are_the_imported_ones():
    """The command line reads BB's defaults and the backend names from the source (no torch): they are the
    values the import gives, and the reader found each one itself rather than falling back to the import."""
    import inspect

    from bbfused.backends import BACKEND_NAMES
    from bbfused.control import PaperControl, PreconditionedControl, SafeguardControl
    from bbfused.optimizer import BB
    from bbfused.preconditioner import NAMES
    from bbfused.train import bb_source

    signature = inspect.signature(BB).parameters
    read = bb_source._source_bb_defaults()
    for name in ("tau0", "tau_min", "tau_max", "backend", "safeguard"):
        assert name in read and read[name] == signature[name].default, name
    assert bb_source.backend_names() == tuple(BACKEND_NAMES)
    assert bb_source._literal_names(bb_source._tree("backends/__init__.py"), "BACKEND_NAMES") == tuple(BACKEND_NAMES)
    assert bb_source._literal_names(bb_source._tree("preconditioner.py"), "NAMES") == NAMES
    for safeguard, (module, kind) in {True: ("safeguard", SafeguardControl), False: ("paper", PaperControl)}.items():
        read_taus = bb_source._class_constant(f"control/{module}.py", kind.__name__, "DEFAULT_TAUS")
        assert read_taus == kind.DEFAULT_TAUS == bb_source.control_taus(safeguard)
    read_limit = bb_source._class_constant("control/preconditioned.py", "PreconditionedControl", "FIRST_RATE_LIMIT")
    assert read_limit == PreconditionedControl.FIRST_RATE_LIMIT == bb_source.preconditioned_first_rate()
    parser_choices = {a.dest: a.choices for a in build_parser()._actions}
    assert parser_choices["bb_backend"] == tuple(BACKEND_NAMES)


def test_output_dir_not_writable(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("keep")
    assert "is a file; pass a folder" in run_bad(["--output-dir", str(a_file)], capsys)
    assert "cannot be created" in run_bad(["--output-dir", str(a_file / "run")], capsys)
    assert a_file.read_text() == "keep"


@pytest.fixture(scope="module")
def mlp_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mlp") / "run"
    assert main([*TINY, "--epochs", "1", "--output-dir", str(out)]) == 0
    return out


def test_existing_run_is_not_overwritten(mlp_checkpoint, tmp_path, capsys):
    before = (mlp_checkpoint / "checkpoint.pth").read_bytes()
    err = run_bad([*TINY, "--epochs", "1", "--output-dir", str(mlp_checkpoint)], capsys)
    assert "already holds a run" in err and "--resume" in err
    # Resuming another run into this folder would overwrite it too.
    other = tmp_path / "other.pth"
    other.write_bytes(before)
    err = run_bad([*TINY, "--epochs", "2", "--resume", str(other), "--output-dir", str(mlp_checkpoint)], capsys)
    assert "overwrite its checkpoint.pth" in err
    assert (mlp_checkpoint / "checkpoint.pth").read_bytes() == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "lenet"], "is a checkpoint of --model mlp, but this run has --model lenet"),
        (["--optimizer", "sgd"], "is a checkpoint of --optimizer bb, but this run has --optimizer sgd"),
        (["--epochs", "1"], "has already trained 1 epochs"),
        (["--limit-train", "512"], "trained with 8 steps per epoch, this run has 16"),
    ],
)
def test_checkpoint_that_does_not_fit(mlp_checkpoint, tmp_path, capsys, argv, message):
    if "--optimizer" in argv:
        base = [a for a in TINY if a not in ("--bb-backend", "eager")]
    else:
        base = TINY
    out = tmp_path / "out"
    argv = [*base, "--epochs", "2", *argv, "--resume", str(mlp_checkpoint / "checkpoint.pth"), "--output-dir", str(out)]
    assert message in run_bad(argv, capsys)
    assert not out.exists()


def test_checkpoint_of_other_weights(image_folder, tmp_path, capsys):
    """An mlp checkpoint trained on 3x16x16 images does not fit the mlp for MNIST."""
    folder_run = tmp_path / "folder"
    argv = ["--data", str(image_folder), "--model", "mlp", "--image-size", "16", "--workers", "0", "--epochs", "1"]
    argv += ["--batch-size", "8"]
    assert main([*argv, "--bb-backend", "eager", "--output-dir", str(folder_run)]) == 0
    resume = ["--resume", str(folder_run / "checkpoint.pth")]
    # --data typed: it overrides the saved run's folder (the other settings come from the checkpoint).
    assert "holds weights that do not fit mlp" in run_bad([*TINY, "--data", "mnist", "--epochs", "2", *resume], capsys)


def test_resume_file_problems(tmp_path, capsys):
    assert "no such file" in run_bad(["--resume", str(tmp_path / "none.pth")], capsys)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    assert "not a readable checkpoint" in run_bad(["--resume", str(junk)], capsys)
    other = tmp_path / "other.pth"
    torch.save({"model": {}}, other)
    assert "not a bbfused-train checkpoint" in run_bad(["--resume", str(other)], capsys)
