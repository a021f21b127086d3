"""One MissingLossWarning when BB's steps come without the loss where its rate control needs it: a model with
BatchNorm given to ``track_buffers`` (in a plain loop, and under accelerate, whose optimizer wrapper takes no
``loss=``), and a plain Hugging Face ``Trainer`` (which names ``BBTrainer``). Silent where the loss comes (as
``loss=`` or from a closure), where BB knows of no BatchNorm, and with the paper's method, which never uses it."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bbfused import BB, MissingLossWarning

STEPS = 3


def bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def caught_in(run: Callable[[], None]) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [w for w in caught if issubclass(w.category, MissingLossWarning)]


def plain_loop(model: torch.nn.Module, opt: BB, give: str, steps: int = 2 * STEPS) -> None:
    for step in range(steps):
        x, y = data(step)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if give == "loss":
            opt.step(loss=loss)
        elif give == "closure":
            opt.step(lambda loss=loss: loss)  # what docs/integrations.md writes as lambda: loss
        else:
            opt.step()


def test_batchnorm_model_stepped_without_loss_warns_once_naming_the_fixes() -> None:
    model = bn_model()
    opt = BB(model.parameters(), lr=0.1, steps_per_epoch=STEPS, backend="eager")
    opt.track_buffers(model)
    found = caught_in(lambda: plain_loop(model, opt, "none"))
    assert len(found) == 1  # six steps over two epochs: one warning
    message = str(found[0].message)
    assert "BatchNorm" in message and "opt.step(loss=loss)" in message and "opt.step(lambda: loss)" in message
    assert found[0].filename == __file__  # the user's step() line, not bbfused's
    assert opt.epoch == 2  # a warning, not an error: the run goes on


@pytest.mark.parametrize(
    "give, safeguard, track, model_fn",
    [
        ("loss", True, True, bn_model),
        ("closure", True, True, bn_model),  # a closure's return value is the loss BB watches
        ("none", True, False, bn_model),  # no track_buffers: BB does not know of the BatchNorm
        ("none", False, True, bn_model),  # the paper's method never uses the loss
        ("none", True, True, lambda: torch.nn.Sequential(torch.nn.Linear(6, 3))),  # no BatchNorm
    ],
)
def test_no_warning_where_the_loss_comes_or_is_not_needed(give, safeguard, track, model_fn) -> None:
    model = model_fn()
    opt = BB(model.parameters(), lr=0.1, steps_per_epoch=STEPS, backend="eager", safeguard=safeguard)
    if track:
        opt.track_buffers(model)
    assert caught_in(lambda: plain_loop(model, opt, give)) == []
    assert opt.epoch == 2


def test_first_step_with_loss_then_one_without_warns_at_that_step() -> None:
    model = bn_model()
    opt = BB(model.parameters(), lr=0.1, steps_per_epoch=STEPS, backend="eager")
    opt.track_buffers(model)
    assert caught_in(lambda: plain_loop(model, opt, "loss", steps=2)) == []
    assert len(caught_in(lambda: plain_loop(model, opt, "none", steps=2))) == 1


def test_accelerate_batchnorm_model_warns_without_the_loss_and_not_with_the_closure() -> None:
    """accelerate's AcceleratedOptimizer.step() takes no loss=: a plain opt.step() warns; the closure of
    docs/integrations.md carries the loss and does not."""
    pytest.importorskip("accelerate")
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    accelerator = Accelerator()
    for give, expected in (("none", 1), ("closure", 0)):
        model = accelerator.prepare(bn_model())
        bb = BB(model.parameters(), lr=0.1, steps_per_epoch=STEPS, backend="eager")
        bb.track_buffers(model)
        opt = accelerator.prepare(bb)
        assert isinstance(opt, AcceleratedOptimizer)
        found = caught_in(lambda model=model, opt=opt, give=give: plain_loop(model, opt, give))
        assert len(found) == expected, give
        assert bb.epoch == 2
    bb_state = bb.state_dict()["bb"]
    assert bb_state["initial_loss"] is not None  # the closure's loss reached the rate control


class _HFClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = bn_model()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


class _Dataset(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x, self.y = data(0)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


@pytest.mark.parametrize("trainer_name", ["Trainer", "BBTrainer"])
def test_plain_hf_trainer_warns_naming_bbtrainer(tmp_path: Path, monkeypatch, trainer_name: str) -> None:
    """Trainer(optimizers=(BB, None)) steps BB without the loss and under its linear decay: one warning naming
    BBTrainer (here without track_buffers: any model). BBTrainer with the same optimizer gives BB the loss."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import transformers

    from bbfused.integrations.huggingface import BBTrainer

    monkeypatch.chdir(tmp_path)
    model = _HFClassifier()
    opt = BB(model.parameters(), lr=0.1, steps_per_epoch=4, epochs=2, backend="eager")
    args = transformers.TrainingArguments(
        output_dir="out", num_train_epochs=2, per_device_train_batch_size=4, report_to=[], save_strategy="no"
    )
    kind = transformers.Trainer if trainer_name == "Trainer" else BBTrainer
    trainer = kind(model=model, args=args, train_dataset=_Dataset(), optimizers=(opt, None))
    found = caught_in(trainer.train)
    assert opt.epoch == 2
    if trainer_name == "BBTrainer":
        assert found == []
        return
    assert len(found) == 1
    message = str(found[0].message)
    assert "transformers' Trainer" in message and "bbfused.integrations.huggingface.BBTrainer" in message
    assert "linear decay" in message
