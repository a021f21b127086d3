"""bbfused.integrations with the real clients: the snippets of docs/integrations.md run as they are, on tiny data."""

from __future__ import annotations

import pathlib
import re
import warnings

import pytest
import torch

from bbfused import BB, GradientReplacedWarning

SNIPPETS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


def _snippet(name: str) -> str:
    found = re.search(rf"<!-- snippet: {name} -->\n```python\n(.*?)```", SNIPPETS.read_text(), re.S)
    assert found, f"docs/integrations.md has no snippet {name!r}"
    return found.group(1)


def _digits(n: int = 128, features: int = 784, seed: int = 0) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=generator)
    x = torch.randn(n, features, generator=generator) * 0.5 + torch.nn.functional.one_hot(y, features).float()
    return torch.utils.data.TensorDataset(x, y)


def _bb_warnings(caught) -> list[str]:
    bad = ("To copy construct", "sets one global learning rate", "Remove the scheduler")
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, GradientReplacedWarning) or any(b in str(w.message) for b in bad)
    ]


# ------------------------------------------------------------------------------------------- Lightning
@pytest.fixture
def lightning_run(tmp_path, monkeypatch):
    L = pytest.importorskip("lightning")
    monkeypatch.chdir(tmp_path)
    namespace = {"dataset": _digits()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(_snippet("lightning"), "README:lightning", "exec"), namespace)
    return L, namespace, caught


def test_lightning_snippet_epochs_loss_and_monitor(lightning_run) -> None:
    L, ns, caught = lightning_run
    opt = ns["trainer"].optimizers[0]
    assert isinstance(opt, BB)
    # 128 samples / 32 = 4 batches, accumulate 2: 2 optimizer steps per epoch, 3 BB epochs in 3 Lightning epochs
    assert opt.steps_per_epoch == 2 and opt.epoch == 3 and opt.step_in_epoch == 0
    assert _bb_warnings(caught) == []
    # The monitor kept plain floats, one per logged step, each the rate BB used then.
    logged = next(iter(ns["monitor"].lrs.values()))
    assert logged and all(type(lr) is float for lr in logged)
    assert set(logged) <= set(opt.lr_history) | {opt.lr}
    # The loss reached the rate control: its initial and best epoch losses are set.
    bb = opt.state_dict()["bb"]
    assert bb["initial_loss"] is not None and bb["best_loss"] is not None
    assert 1.0 < bb["initial_loss"] < 4.0  # a 10-class cross-entropy at start, not a sum or a scaled value


def _tiny_module(L, accumulate: int, steps: int | None, seen: list, only_trainable: bool = False):
    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(784, 10)
            self.micro = []

        def training_step(self, batch, batch_idx):
            loss = torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            self.micro.append(loss.detach().float().item())
            return loss

        def configure_optimizers(self):
            from bbfused.integrations.lightning import steps_per_epoch

            params = [p for p in self.parameters() if p.requires_grad or not only_trainable]
            opt = BB(params, lr=0.1, steps_per_epoch=steps or steps_per_epoch(self.trainer))
            opt._control.add_loss = lambda loss, add=opt._control.add_loss: (seen.append(float(loss)), add(loss))[1]
            return opt

    return Tiny()


def _fit(L, module, tmp_path, callbacks=(), **kwargs):
    """Fit ``module`` on the digits with BBCallback first, then ``callbacks``; quiet, nothing written (but what
    the test saves); ``ckpt_path`` resumes."""
    from bbfused.integrations.lightning import BBCallback

    ckpt_path = kwargs.pop("ckpt_path", None)
    trainer = L.Trainer(
        max_epochs=kwargs.pop("max_epochs", 1),
        callbacks=[BBCallback(), *callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )
    trainer.fit(module, torch.utils.data.DataLoader(_digits(), batch_size=32), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("precision", ["32", "16-mixed", "bf16-mixed"])
def test_lightning_step_loss_is_the_mean_of_the_micro_batches(tmp_path, precision) -> None:
    L = pytest.importorskip("lightning")
    seen: list[float] = []
    module = _tiny_module(L, 2, None, seen)
    kwargs = {"accumulate_grad_batches": 2, "gradient_clip_val": 0.5}
    if precision == "bf16-mixed":  # autocast without a GradScaler; Lightning refused clipping for BB
        kwargs["precision"] = precision
    elif precision != "32":
        from lightning.pytorch.plugins.precision import MixedPrecision

        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
    _fit(L, module, tmp_path, **kwargs)
    expected = [(a + b) / 2 for a, b in zip(module.micro[::2], module.micro[1::2])]
    assert seen == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_lightning_amp_clipping_unscales_before_clipping(tmp_path, precision) -> None:
    L = pytest.importorskip("lightning")
    from lightning.pytorch.plugins.precision import MixedPrecision

    norms = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            norms.append(float(torch.cat([p.grad.flatten() for p in pl_module.parameters()]).norm()))

    module = _tiny_module(L, 1, None, [])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if precision == "16-mixed" else None
    plugin = MixedPrecision(precision, "cpu", scaler=scaler)
    _fit(L, module, tmp_path, callbacks=[Probe()], plugins=[plugin], gradient_clip_val=0.01)
    assert len(norms) == 4 and all(n <= 0.01 * 1.001 for n in norms)  # clipped, after unscaling
    assert module.net.weight.isfinite().all()


def test_lightning_wrong_steps_per_epoch_names_the_fix(tmp_path) -> None:
    L = pytest.importorskip("lightning")
    module = _tiny_module(L, 2, 4, [])  # len(loader) = 4 batches, but 2 optimizer steps an epoch
    with pytest.raises(ValueError, match=r"steps_per_epoch=4.*2 optimizer steps.*steps_per_epoch\(self.trainer\)"):
        _fit(L, module, tmp_path, accumulate_grad_batches=2)


def test_lightning_finetuning_adds_the_unfrozen_group(tmp_path) -> None:
    """BaseFinetuning.unfreeze_and_add_param_group adds the body to a BB over the head at the start of epoch 1. Until
    the end of epoch 1 that is what BB over every parameter with the body unfrozen by make_trainable does (the added
    group joins the BB estimate one epoch end later): the weights after two epochs are the same bits."""
    L = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import BaseFinetuning

    class Unfreeze(BaseFinetuning):
        def __init__(self, add_group: bool):
            super().__init__()
            self.add_group = add_group

        def freeze_before_training(self, pl_module):
            self.freeze(pl_module.net[0])

        def finetune_function(self, pl_module, epoch, optimizer):
            if epoch == 1 and self.add_group:
                self.unfreeze_and_add_param_group(pl_module.net[0], optimizer)
            elif epoch == 1:
                self.make_trainable(pl_module.net[0])

    def module(only_trainable):
        m = _tiny_module(L, 1, None, [], only_trainable)
        torch.manual_seed(0)
        m.net = torch.nn.Sequential(torch.nn.Linear(784, 16), torch.nn.Linear(16, 10))
        return m

    results = {}
    for add_group in (False, True):
        m = module(only_trainable=add_group)
        frozen = m.net[0].weight.detach().clone()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = _fit(L, m, tmp_path, callbacks=[Unfreeze(add_group)], max_epochs=2)
        opt = trainer.optimizers[0]
        assert not torch.equal(m.net[0].weight, frozen)  # trained in epoch 1 once unfrozen
        results[add_group] = [p.detach().clone() for p in m.net.parameters()], opt
    (built_weights, built), (added_weights, added) = results[False], results[True]
    assert len(built.param_groups) == 1 and len(added.param_groups) == 2
    assert added.param_groups[1]["lr"] == added.lr and added.state_dict()["bb"]["join_epochs"] == [0, 2]
    # Lightning asks for the first group's lr / 10; BB keeps one rate and says so.
    assert any("the added group's lr" in str(w.message) for w in caught)
    assert added.lr_history == built.lr_history
    for p, q in zip(added_weights, built_weights):
        assert torch.equal(p, q)


def test_lightning_finetuning_resumes_with_the_added_group(tmp_path) -> None:
    """Resuming, BaseFinetuning assigns optimizer.param_groups the groups it saved, the added one included, before
    the optimizer state is loaded: BB adds that group and the resumed run continues as the uninterrupted one."""
    L = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import BaseFinetuning

    class Unfreeze(BaseFinetuning):
        def freeze_before_training(self, pl_module):
            self.freeze(pl_module.net[0])

        def finetune_function(self, pl_module, epoch, optimizer):
            if epoch == 1:
                self.unfreeze_and_add_param_group(pl_module.net[0], optimizer)
            elif epoch > 1:  # resumed: freeze_before_training froze it again, and the group is back already
                self.make_trainable(pl_module.net[0])

    def module():
        m = _tiny_module(L, 1, None, [], only_trainable=True)
        torch.manual_seed(0)
        m.net = torch.nn.Sequential(torch.nn.Linear(784, 16), torch.nn.Linear(16, 10))
        return m

    first = module()
    _fit(L, first, tmp_path, callbacks=[Unfreeze()], max_epochs=2).save_checkpoint(tmp_path / "two.ckpt")
    uninterrupted = module()
    reference = _fit(L, uninterrupted, tmp_path, callbacks=[Unfreeze()], max_epochs=4).optimizers[0]
    resumed = module()
    trainer = _fit(L, resumed, tmp_path, callbacks=[Unfreeze()], max_epochs=4, ckpt_path=tmp_path / "two.ckpt")
    opt = trainer.optimizers[0]
    assert len(opt.param_groups) == 2 and opt.state_dict()["bb"]["join_epochs"] == [0, 2]
    assert opt.lr_history == reference.lr_history
    for p, q in zip(resumed.parameters(), uninterrupted.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------------- Hugging Face
class _HFClassifier(torch.nn.Module):
    """The smallest model Trainer accepts: forward(x, labels) returns a dict with the loss."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(784, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 10))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


class _DictDataset(torch.utils.data.Dataset):
    def __init__(self, tensors):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors)

    def __getitem__(self, i):
        x, y = self.tensors[i]
        return {"x": x, "labels": y}


def test_huggingface_snippet(tmp_path, monkeypatch) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = _HFClassifier()
    micro: list[float] = []
    original_forward = model.forward

    def forward(x, labels=None):
        out = original_forward(x, labels)
        micro.append(float(out["loss"]))
        return out

    model.forward = forward
    namespace = {"model": model, "dataset": _DictDataset(_digits())}
    code = _snippet("huggingface").replace("trainer.train()", "")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, "README:huggingface", "exec"), namespace)
        trainer = namespace["trainer"]
        trainer.args.logging_steps = 1
        trainer.train()
    opt = trainer.optimizer.optimizer if not isinstance(trainer.optimizer, BB) else trainer.optimizer
    assert isinstance(opt, BB) and opt.steps_per_epoch == 2 and opt.epoch == 3
    assert _bb_warnings(caught) == []
    # Decay where Trainer decays: the Linear weights; no decay on biases and the LayerNorm.
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(model.net[0].weight)] == 5e-4 and decays[id(model.net[1].weight)] == 0.0
    assert decays[id(model.net[0].bias)] == 0.0
    # The logged learning rate is BB's: each step's the rate of its epoch.
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    epochs = [opt.lr_history[step // 2] for step in range(6)]
    assert logged == pytest.approx(epochs)
    # The loss reached the rate control (10 classes: about ln 10 at the start).
    bb = opt.state_dict()["bb"]
    assert bb["initial_loss"] == pytest.approx((micro[0] + micro[1]) / 2, rel=1e-5)


# ------------------------------------------------------------------------------------------- timm
def test_timm_snippet_keeps_timm_groups(monkeypatch) -> None:
    timm = pytest.importorskip("timm")
    namespace = {"loader": [None] * 3}
    exec(compile(_snippet("timm"), "README:timm", "exec"), namespace)
    opt, model = namespace["opt"], namespace["model"]
    assert isinstance(opt, BB) and opt.steps_per_epoch == 3
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(model.conv1.weight)] == 1e-4
    assert decays[id(model.bn1.weight)] == 0.0 and decays[id(model.fc.bias)] == 0.0
    assert len(decays) == len(list(model.parameters()))
    from bbfused.integrations.timm import register

    register()  # again: no second entry, no warning
    x = torch.randn(2, 3, 32, 32)
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="layer_decay"):
        timm.optim.create_optimizer_v2(model, opt="bb", lr=0.1, layer_decay=0.7, steps_per_epoch=3)
    linear = torch.nn.Linear(3, 2, bias=False)  # no 1-d parameter: timm's no-decay group is empty
    assert len(timm.optim.create_optimizer_v2(linear, opt="bb", lr=0.1, steps_per_epoch=3).param_groups) == 1


# ------------------------------------------------------------------------------------------- EMA through a rollback
def test_ema_snippet_equals_the_ema_of_the_run_without_the_rolled_back_periods() -> None:
    """The snippet's linear model at lr 0.1 diverges in the first epoch's search (rolled back). Recorded here: the
    weights after every step and each period end; the reference EMA averages the same weights with every
    rolled-back period left out (at a rollback the model is back at the last good period end, which the EMA has
    already averaged in; before any good period end, the initial weights)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = torch.nn.Linear(784, 10)
    weights, ends, watched = [], {}, []

    def watch(opt, args, kwargs) -> None:
        if not watched:
            watched.append(opt)
            opt.register_period_end_hook(lambda o, epoch, back: ends.__setitem__(len(weights), back))

    def record(opt, args, kwargs) -> None:
        weights.append([p.detach().clone() for p in model.parameters()])

    handles = [register_optimizer_step_pre_hook(watch), register_optimizer_step_post_hook(record)]
    try:
        namespace = {"model": model, "loader": torch.utils.data.DataLoader(_digits(), batch_size=8)}
        exec(compile(_snippet("ema"), "docs:ema", "exec"), namespace)
    finally:
        for handle in handles:
            handle.remove()
    opt, ema = namespace["opt"], namespace["ema"]
    assert opt.rolled_back_epochs == [0] and sum(ends.values()) >= 1 and len(weights) == 3 * 16

    kept, pending = [], []
    for index, w in enumerate(weights):
        pending.append(w)
        if index in ends:
            if ends[index]:
                pending = [] if kept else [w]  # w: the weights of the last good period end (or the initial ones)
            kept, pending = kept + pending, []
    reference_model = torch.nn.Linear(784, 10)
    reference = AveragedModel(reference_model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    for w in kept + pending:
        with torch.no_grad():
            for p, value in zip(reference_model.parameters(), w):
                p.copy_(value)
        reference.update_parameters(reference_model)
    assert int(ema.n_averaged) == len(kept + pending) < len(weights)
    for mine, theirs in zip(ema.module.parameters(), reference.module.parameters()):
        assert torch.equal(mine, theirs)


# ------------------------------------------------------------------------------------------- accelerate
def test_accelerate_snippet_gives_bb_the_loss_through_a_closure() -> None:
    """accelerate's optimizer wrapper takes no loss=; the closure carries each optimizer step's loss (the last
    micro-batch's under accumulation) to the rate control, and a BB epoch is one pass over the loader."""
    pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(784, 10)
    x, y = _digits()[32:64]
    with torch.no_grad():
        second = float(torch.nn.functional.cross_entropy(model(x), y))  # before any update: accumulation
    namespace = {"model": model, "loader": torch.utils.data.DataLoader(_digits(), batch_size=32)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(_snippet("accelerate"), "docs:accelerate", "exec"), namespace)
    wrapped = namespace["opt"]
    assert isinstance(wrapped, AcceleratedOptimizer) and isinstance(wrapped.optimizer, BB)
    opt = wrapped.optimizer
    assert opt.steps_per_epoch == 2 and opt.epoch == 3 and opt.step_in_epoch == 0
    assert _bb_warnings(caught) == []
    bb = opt.state_dict()["bb"]
    assert bb["initial_loss"] is not None and bb["best_loss"] is not None
    assert bb["initial_loss"] == pytest.approx(second, rel=1e-6)  # the first optimizer step's last micro-batch
